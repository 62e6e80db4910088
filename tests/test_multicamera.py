"""Several cameras through one inference process and one shared detector, on real clips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import MEDIA

from edgecam.config import load_settings
from edgecam.errors import UsageError
from edgecam.media.offline import FileJob, process_file, process_files

CLIPS = [MEDIA / "faces.mp4", MEDIA / "motion_720p30_4s.mp4", MEDIA / "faces_720p30_15s.mp4"]
EDGECAM = [sys.executable, "-m", "edgecam.cli"]


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_file_beside_others_gives_its_solo_events(tmp_path: Path) -> None:
    settings = load_settings(**{"vision.detect_fps": 5})
    solo = tmp_path / "solo"
    for clip in CLIPS:
        process_file(
            settings,
            clip,
            solo / f"{clip.stem}.mp4",
            events=solo / f"{clip.stem}.jsonl",
            progress=False,
        )
    together = tmp_path / "together"
    jobs = [FileJob(c, together / f"{c.stem}.mp4", together / f"{c.stem}.jsonl") for c in CLIPS]
    results = process_files(settings, jobs, progress=False)

    assert [r.frames for r in results] == [120, 122, 450]
    assert [r.detections for r in results] == [20, 21, 75]  # every due frame: 5 a second
    tracked = 0
    for clip in CLIPS:
        alone = _events(solo / f"{clip.stem}.jsonl")
        beside = _events(together / f"{clip.stem}.jsonl")
        assert beside == alone, f"{clip.name}: events differ beside other files"
        assert (together / f"{clip.stem}.mp4").stat().st_size > 10_000
        tracked += sum(len(e["tracks"]) for e in alone)
    assert tracked > 1000  # faces were found and tracked: the comparison has content


def test_process_files_refuses_two_inputs_writing_one_output(tmp_path: Path) -> None:
    jobs = [FileJob(CLIPS[0], tmp_path / "o.mp4"), FileJob(CLIPS[1], tmp_path / "o.mp4")]
    with pytest.raises(UsageError, match="same output"):
        process_files(load_settings(), jobs, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a.mp4", "b.mp4", "--out", "o.mp4"], "--out-dir"),
        (["a.mp4"], "--out OUT.mp4"),
        (["a.mp4", "--out-dir", "d", "--events", "e.jsonl"], "drop --events"),
    ],
)
def test_process_command_options_for_several_inputs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = subprocess.run(
        [*EDGECAM, "process", *[str(tmp_path / a) if a.endswith(".mp4") else a for a in args]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert message in res.stderr


def test_process_command_runs_several_files_into_a_folder(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *EDGECAM,
            "process",
            str(CLIPS[0]),
            str(CLIPS[1]),
            "--out-dir",
            str(tmp_path / "out"),
            "--detect-fps",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    for clip, frames in ((CLIPS[0], 120), (CLIPS[1], 122)):
        assert len(_events(tmp_path / "out" / f"{clip.stem}.jsonl")) == frames
        assert (tmp_path / "out" / f"{clip.stem}.mp4").stat().st_size > 10_000
