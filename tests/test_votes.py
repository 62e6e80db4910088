"""The per-track voting rule, as a table of vote sequences and the labels they give."""

from __future__ import annotations

import numpy as np
import pytest

from edgecam.config import VotingConfig
from edgecam.vision.votes import MASK, NO_MASK, PERSON, UNDECIDED, LabelVoter

M, N = 0.9, 0.1  # a confident "mask" and a confident "no mask" vote


def _run(probs: list[float], **cfg: float) -> list[str]:
    voter = LabelVoter(VotingConfig.model_validate(cfg))
    out = []
    for frame, p in enumerate(probs):
        states = voter.update_states(
            frame, np.array([7]), np.array([p], dtype=np.float32), np.array([True])
        )
        out.append(states[0].label)
    return out


@pytest.mark.parametrize(
    ("probs", "cfg", "last"),
    [
        ([M, M], {}, UNDECIDED),  # fewer than min_votes
        ([M, M, M], {}, MASK),
        ([N, N, N], {}, NO_MASK),
        ([M, N, M, N], {}, UNDECIDED),  # no label reaches 'enter'
        ([M] * 5 + [N] * 2, {}, MASK),  # 5/7 mask: hysteresis keeps the label
        ([M] * 5 + [N] * 6, {}, UNDECIDED),  # mask fell below 'leave'; no_mask not yet 'enter'
        ([M] * 5 + [N] * 12, {}, NO_MASK),  # 12 of the last 15 say no mask
        ([M] * 3 + [N] * 2, {"enter": 0.9, "leave": 0.55}, MASK),  # 3/5 still >= leave
        ([M] * 3 + [N] * 3, {"enter": 0.9, "leave": 0.55}, UNDECIDED),  # 3/6 < leave
        ([M] * 10 + [N] * 5, {"window": 5}, NO_MASK),  # only the last 5 votes count
        ([0.5] * 3, {"mask_threshold": 0.5}, MASK),  # the threshold itself votes mask
        ([float("nan")] * 5, {}, UNDECIDED),  # no classifier result, no vote
    ],
)
def test_vote_rule(probs: list[float], cfg: dict[str, float], last: str) -> None:
    assert _run(probs, **cfg)[-1] == last


def test_label_flips_only_after_sustained_change() -> None:
    labels = _run([M] * 6 + [N] * 14)
    # mask from the 3rd vote; kept while mask votes are >= 50 % (6 of 12)
    assert labels[2:12] == [MASK] * 10
    assert labels[12] == UNDECIDED
    # no_mask only once >= 70 % of the last 15 (the window) say so
    assert labels.index(NO_MASK) == 16  # 11 of the last 15 votes (73 %)


def test_unmatched_frames_do_not_vote() -> None:
    voter = LabelVoter(VotingConfig())
    for frame in range(10):
        states = voter.update_states(
            frame, np.array([1]), np.array([M], dtype=np.float32), np.array([False])
        )
    assert [st.label for st in states] == [UNDECIDED]


def test_people_profile_has_one_label() -> None:
    voter = LabelVoter(VotingConfig(), classify=False)
    states = voter.update_states(0, np.array([1, 2]), np.full(2, np.nan), np.array([True, False]))
    assert [st.label for st in states] == [PERSON, PERSON]
    assert voter.labels == (PERSON,)


@pytest.mark.parametrize(
    "cfg", [{"leave": 0.8, "enter": 0.7}, {"min_votes": 20, "window": 10}, {"enter": 0.4}]
)
def test_bad_voting_config_rejected(cfg: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        VotingConfig.model_validate(cfg)


def _settled(probs: list[float], frame_gap: int = 0, **cfg: int) -> bool:
    """Whether the track is settled ``frame_gap`` frames after its last vote."""
    voter = LabelVoter(VotingConfig.model_validate(cfg))
    for frame, p in enumerate(probs):
        (state,) = voter.update_states(
            frame, np.array([7]), np.array([p], dtype=np.float32), np.array([True])
        )
    return voter.settled(state, len(probs) - 1 + frame_gap)


@pytest.mark.parametrize(
    ("probs", "gap", "cfg", "settled"),
    [
        ([N] * 4, 0, {}, False),  # labelled, but only 4 votes
        ([N] * 5, 0, {}, True),  # 5 agreeing votes
        ([M] * 5, 0, {}, True),
        ([M] * 8 + [N] + [M] * 4, 0, {}, False),  # one odd vote among the last 5
        ([M] * 8 + [N] + [M] * 5, 0, {}, True),
        ([M] * 20 + [N] * 5, 0, {}, False),  # 5 agreeing votes, but against the label kept
        ([M] * 5, 29, {}, True),
        ([M] * 5, 30, {}, False),  # recheck_frames without a vote: classify again
        ([M] * 5, 10, {"recheck_frames": 10}, False),
        ([M] * 5, 0, {"settle_votes": 0}, False),  # off
        ([M] * 3, 0, {"settle_votes": 3}, True),
        ([M, N] * 5, 0, {}, False),  # undecided
    ],
)
def test_settled_rule(probs: list[float], gap: int, cfg: dict[str, int], settled: bool) -> None:
    assert _settled(probs, gap, **cfg) is settled
