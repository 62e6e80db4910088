"""Storage: downsampled history answers long ranges after retention; SQLite under concurrent
writes and reads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from edgecam.ratelimit import MAX_TRACKED, Every, Failures, client_key
from edgecam.server import db
from edgecam.server.api import _device_link
from edgecam.server.app import prune_clips
from edgecam.server.auth import LoginLimiter
from edgecam.server.queries import downsample, prune_history, stats_buckets, stats_raw
from edgecam.server.simulate import make_stats
from edgecam.server.store import Store


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = db.make_engine(database_url)
    db.migrate(eng)
    db.migrate(eng)  # a second start finds the schema current
    yield eng
    eng.dispose()


def test_history_survives_retention_and_answers_buckets(engine: Engine) -> None:
    store = Store(engine)
    now = time.time()
    hour = math.floor(now / 3600) * 3600
    t0 = hour - 4 * 3600
    sent = [make_stats("cam-1", i, t0 + i * 10 + 10, 10.0) for i in range(4 * 360)]
    for i in range(0, len(sent), 500):
        store.write([("cam-1", m) for m in sent[i : i + 500]])
    replay = store.write([("cam-1", m) for m in sent[:700]])  # replayed: counted nowhere
    assert replay.stored == 0 and replay.duplicates == 700
    total_people = sum(m.people for m in sent)
    with engine.connect() as conn:
        before = stats_buckets(conn, "cam-1", t0, hour, 3600)
    assert [b["messages"] for b in before] == [360] * 4

    result = downsample(engine, raw_days=2 / 24, history_days=30)
    assert result["hours"] == 4
    assert result["raw_deleted"] == 2 * 360
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(db.StatsRow)) == 2 * 360
        after = stats_buckets(conn, "cam-1", t0, hour, 3600)
        assert after == before
        assert sum(b["people"] for b in after) == total_people
        # Raw rows are still there for the recent part, each with its seq.
        raw = stats_raw(conn, "cam-1", hour - 3600, hour)
        assert [r["seq"] for r in raw] == list(range(3 * 360, 4 * 360))
        # Per-minute sums (what charts read) agree with the raw messages.
        minutes = stats_buckets(conn, "cam-1", hour - 3600, hour, 60)
        seconds = stats_buckets(conn, "cam-1", hour - 3600, hour, 30)
        assert sum(b["people"] for b in minutes) == sum(b["people"] for b in seconds)
        assert [b["messages"] for b in minutes] == [6] * 60
        # A second run changes nothing.
        downsample(engine, raw_days=2 / 24, history_days=30)
        assert stats_buckets(conn, "cam-1", t0, hour, 3600) == before
    store.close()


def test_sqlite_concurrent_ingest_and_reads_never_lock(tmp_path: object) -> None:
    eng = db.make_engine(f"sqlite:///{tmp_path}/c.db")
    db.migrate(eng)
    errors: list[BaseException] = []
    done = threading.Event()

    def write(device: str) -> None:
        store = Store(eng)
        try:
            for batch in range(20):
                store.write(
                    [(device, make_stats(device, batch * 50 + i, 1000.0 + i)) for i in range(50)]
                )
                store.touch({device: time.time()})
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                with eng.connect() as conn:
                    stats_raw(conn, "a", 0, 1e10)
                    stats_buckets(conn, "b", 0, 1e10, 60)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(d,)) for d in ("a", "b")]
    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors
    with eng.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(db.StatsRow)) == 2000
    eng.dispose()


def test_statuses_commands_and_alerts_do_not_pile_up(engine: Engine) -> None:
    """A device sending statuses at a kilohertz (or alerts without end) would otherwise grow
    the database for good: only stats were ever deleted."""
    now = time.time()
    old, recent, ancient = now - 31 * 86400, now - 29 * 86400, now - 401 * 86400
    with engine.begin() as conn:
        conn.execute(db.Device.__table__.insert().values(name="cam-1"))
        for i, ts in enumerate((old, recent)):
            conn.execute(
                db.StatusRow.__table__.insert().values(
                    id=f"s{i}", device="cam-1", ts=ts, state="online"
                )
            )
            conn.execute(
                db.CommandRow.__table__.insert().values(
                    id=f"c{i}", device="cam-1", name="status", args={}, ts=ts, sent=True
                )
            )
            conn.execute(
                db.CommandResult.__table__.insert().values(
                    id=f"r{i}", command_id=f"c{i}", device="cam-1", ok=True, data={}, ts=ts
                )
            )
        for i, ts in enumerate((ancient, old)):
            conn.execute(
                db.Alert.__table__.insert().values(
                    id=f"a{i}", alert_id=f"a{i}", device="cam-1", rule="occupancy",
                    state="raised", message="", started=ts, ts=ts,
                )
            )  # fmt: skip
    deleted = prune_history(engine, raw_days=30, history_days=400)
    assert deleted == {"statuses": 1, "commands": 1, "results": 1, "alerts": 1}
    with engine.connect() as conn:
        for table, kept in [
            (db.StatusRow, ["s1"]),
            (db.CommandRow, ["c1"]),
            (db.CommandResult, ["r1"]),
            (db.Alert, ["a1"]),
        ]:
            assert sorted(conn.scalars(select(table.id))) == kept, table
    assert prune_history(engine, raw_days=30, history_days=400) == dict.fromkeys(deleted, 0)


def test_clip_retention_by_age_then_size(tmp_path: Path) -> None:
    folder = tmp_path / "clips"
    (folder / "cam-1").mkdir(parents=True)
    now = time.time()
    for i, age_days in enumerate([40, 3, 2, 1]):
        path = folder / "cam-1" / f"c{i}.mp4"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    assert prune_clips(folder, max_age_days=30, max_bytes=2500) == 2  # too old, then too big
    assert sorted(p.name for p in folder.rglob("*.mp4")) == ["c2.mp4", "c3.mp4"]


def test_link_to_the_device_file_server_verifies_there() -> None:
    from urllib.parse import parse_qs, urlsplit

    from edgecam.device.fileserver import verify_link

    link = _device_link("http://{device}.lan:8081", "s3cret", "main-1.mp4", 600, "cam-1")
    url = urlsplit(link)
    assert url.netloc == "cam-1.lan:8081" and url.path == "/clips/main-1.mp4"
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert (
        verify_link("s3cret", "main-1.mp4", q["expires"], q["sig"], time.time(), ttl_s=600) is None
    )
    assert verify_link("other", "main-1.mp4", q["expires"], q["sig"], time.time(), ttl_s=600)


def test_login_limiter_locks_then_forgets() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=0.3)
    for _ in range(3):
        assert limiter.attempt("A", "10.0.0.1")  # each a failure (none succeeded)
    assert not limiter.attempt("a", "10.0.0.1")  # names are the same in any case
    assert limiter.locked("a", "10.0.0.1")
    # The name is not locked from another address, nor another name from this one yet.
    assert not limiter.locked("a", "10.0.0.2") and not limiter.locked("b", "10.0.0.1")
    time.sleep(0.35)
    assert not limiter.locked("a", "10.0.0.1")


def test_one_address_trying_many_names_is_locked_out_whole() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=60)
    for i in range(3 * LoginLimiter.ADDRESS_FACTOR - 1):
        assert limiter.attempt(f"user{i}", "10.0.0.1")
    assert limiter.attempt("someone", "10.0.0.1")
    limiter.succeeded("someone", "10.0.0.1")  # a right password gives its place back
    assert not limiter.locked("anyone", "10.0.0.1")
    assert limiter.attempt("one-more", "10.0.0.1")
    assert limiter.locked("anyone", "10.0.0.1") and not limiter.attempt("anyone", "10.0.0.1")
    assert not limiter.locked("anyone", "10.0.0.2")


def test_an_ipv6_host_counts_as_its_whole_slash_64() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=60)
    for i in range(3):
        assert limiter.attempt("admin", f"2001:db8:1:2::{i + 1:x}")
    assert not limiter.attempt("admin", "2001:db8:1:2:ffff::9")
    assert limiter.attempt("admin", "2001:db8:1:3::1")  # another /64
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"


def test_logins_sent_at_once_cannot_all_be_tried() -> None:
    """Each attempt takes its place before the password is checked: 50 threads at once get
    no more tries than one after another (each checked the lock, then all counted)."""
    limiter = LoginLimiter(max_failures=5, window_s=60)
    start = threading.Barrier(50)
    let_in: list[bool] = []

    def one() -> None:
        start.wait()
        let_in.append(limiter.attempt("admin", "10.0.0.1"))

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert let_in.count(True) == 5


def test_asking_the_limiter_about_new_names_costs_no_memory() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=60)
    for i in range(3 * LoginLimiter.ADDRESS_FACTOR):
        limiter.attempt(f"user{i}", "10.0.0.1")
    tracked = len(limiter)
    # A locked-out client spraying user names: each is only looked up, never kept (each
    # used to add an entry, ~1 KB, freed never while the lock lasted).
    assert not any(limiter.attempt(f"user:{i}", "10.0.0.1") for i in range(10_000))
    assert len(limiter) == tracked


def test_every_is_due_at_once_then_once_a_window() -> None:
    every = Every(0.3)
    assert every.due()  # the first warning is said at once (right after boot too)
    assert not every.due()
    time.sleep(0.35)
    assert every.due() and not every.due()


def test_failures_stay_bounded_when_every_key_is_fresh() -> None:
    failures = Failures(window_s=3600)
    for _ in range(50):
        failures.add_within({"admin": 50})  # a name at its limit
    for i in range(3 * MAX_TRACKED):  # keys sprayed to push it out
        assert failures.add_within({f"2001:db8:{i:x}::/64": 5})
    assert len(failures) <= MAX_TRACKED
    assert failures.count("admin") == 50  # the spray went, the lock stayed


def test_migrations_upgrade_a_database_with_data(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    eng = db.make_engine(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with eng.begin() as conn:
        for i in range(120):  # two minutes of 1 s stats, written as 0001 knew them
            conn.execute(
                db.StatsRow.__table__.insert().values(
                    id=f"{i:032x}",
                    device="old",
                    camera="main",
                    seq=i,
                    ts=6000.0 + i,
                    t_start=6000.0 + i,
                    t_end=6001.0 + i,
                    people=2,
                    peak=2,
                    mask=1,
                    no_mask=1,
                    undecided=0,
                    person=0,
                    fps_in=1.0,
                    fps_out=1.0,
                    frames_dropped=0,
                    received=1.0,
                )
            )
    db.migrate(eng)
    with eng.connect() as conn:
        minutes = stats_buckets(conn, "old", 6000, 6120, 60)
        assert [(b["messages"], b["people"]) for b in minutes] == [(60, 120), (60, 120)]
        assert conn.scalar(select(db.Device.outbox_dropped)) is None
    eng.dispose()


def test_migrations_make_the_schema_the_models_describe(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
    assert diff == []


def test_a_full_disk_answers_507_and_loses_nothing_once_freed(tmp_path: Path) -> None:
    """Real full disks: two 4 MiB tmpfs, the database's and the clips', mounted in a user
    and mount namespace of the test's own. Before, login, upload and commands answered a
    bare 500 ("Internal Server Error")."""
    here = Path(__file__).resolve().parent
    mount = tmp_path / "disk"
    mount.mkdir()
    clip = here.parent / "media" / "motion_720p30_4s.mp4"
    script = here / "full_disk_server.py"
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, str(script), str(mount), str(clip)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    full, freed = seen["full"], seen["freed"]
    # The login page says why, as a page; the API says it as JSON.
    assert full["login"] == [507, "text/html; charset=utf-8"]
    assert full["login_error"] == [
        "The server cannot log you in now (its disk is full); try again later."
    ]
    assert full["upload"] == [507, "the server's disk is full: the clip was not stored"]
    assert full["command"] == [507, "the server's disk is full: nothing was stored"]
    assert full["read"] == 200  # reading goes on
    assert full["files"] == []  # no partial clip left behind
    # Room for the clip but none for its row: the clip written is taken back.
    database_full = seen["database_full"]
    assert database_full["upload"] == [507, "the server's disk is full: nothing was stored"]
    assert database_full["files"] == []
    assert "database or disk is full" in done.stderr  # the details are in the log
    # Once there is room, the same requests work: nothing is stuck.
    assert freed["login"][0] == 303
    assert freed["upload"][0] == 201
    assert freed["files"] == ["main-20260101-000000.mp4"]


def test_many_addresses_guessing_one_name_lock_it_but_not_for_its_known_browsers() -> None:
    limiter = LoginLimiter(max_failures=5, window_s=60, secret=b"k" * 32)
    stamp = "stamp-of-the-password"
    known = limiter.known_value("admin", stamp)  # this browser logged in as admin before
    assert limiter.is_known(known, "Admin", stamp)
    assert not limiter.is_known(known, "other", stamp)
    guesses = 5 * LoginLimiter.NAME_FACTOR
    for i in range(guesses):  # four tries from each of many addresses
        assert limiter.attempt("admin", f"198.51.100.{i // 4}")
    assert limiter.locked("admin", "203.0.113.1")  # a new browser, a new address
    assert not limiter.attempt("admin", "203.0.113.1")
    assert limiter.attempt("admin", "203.0.113.1", known=limiter.is_known(known, "admin", stamp))
    assert not limiter.locked("someone-else", "203.0.113.1")
    # A cookie is known only as made, for its name, until it expires.
    assert not limiter.is_known(known.replace(".", ".0"), "admin", stamp)
    assert not limiter.is_known("99." + known.split(".")[1], "admin", stamp)
    assert not limiter.is_known(known, "admin", stamp, now=time.time() + 91 * 86400)
    assert not LoginLimiter(5, 60, secret=b"x" * 32).is_known(known, "admin", stamp)
    assert not limiter.is_known(None, "admin", stamp)
    assert not limiter.is_known("", "admin", stamp)
    # A new password (or no such user any more): the browser is unknown again.
    assert not limiter.is_known(known, "admin", "stamp-of-the-next-password")
    assert not limiter.is_known(known, "admin", None)


def test_the_login_key_outlives_a_restart_and_is_the_servers_own(tmp_path: Path) -> None:
    from edgecam.server.app import _login_key

    key = _login_key(tmp_path / "clips")
    assert key is not None and len(key) == 32
    assert _login_key(tmp_path / "clips") == key  # the next run reads the same
    assert (tmp_path / "clips" / ".login-key").stat().st_mode & 0o777 == 0o600
    before = LoginLimiter(5, 60, key).known_value("admin", "s")
    assert LoginLimiter(5, 60, _login_key(tmp_path / "clips")).is_known(before, "admin", "s")
    # A start that died half-way left it empty: it is replaced, and kept from then on.
    (tmp_path / "clips" / ".login-key").write_bytes(b"")
    fresh = _login_key(tmp_path / "clips")
    assert fresh is not None and len(fresh) == 32 and fresh != key
    assert _login_key(tmp_path / "clips") == fresh
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == [".login-key"]
