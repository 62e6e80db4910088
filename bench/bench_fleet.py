"""Fleet server under load: MQTT ingest of many simulated devices into PostgreSQL, the stats
API under that load, and the device page's time to first chart in a browser.

Everything runs on 127.0.0.1: a Mosquitto of its own, a fresh PostgreSQL database, the real
`edgecam server` (a subprocess) with 1 and then 2 ingest processes. Publisher processes send
stats of ``--devices`` simulated devices at ``--rate`` messages a second in total (QoS 1)
for ``--seconds``; the bench then counts the rows in the database (zero loss means every
message stored, each once). Meanwhile one thread asks the API for one device's last 24 h of
1 s stats (86,400 messages, loaded before the run), bucketed per minute as the dashboard
asks, and raw.

    .venv/bin/python bench/bench_fleet.py [--devices 1000] [--rate 5000] [--seconds 20]
        [--processes 1,2] [--pg postgresql://USER:PW@127.0.0.1:5432/DB] [--no-browser]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _common  # puts src/ on sys.path
import httpx
import paho.mqtt.client as mqtt
import psutil
import psycopg
import yaml
from sqlalchemy import func, select

from edgecam.ports import free_port
from edgecam.protocol import topic
from edgecam.server import auth, db
from edgecam.server.simulate import make_stats
from edgecam.server.store import Store

ROOT = Path(__file__).resolve().parents[1]
DAY = 86_400
DAY_DEVICE = "day-cam"
PG_DEFAULT = os.environ.get(
    "EDGECAM_TEST_PG", "postgresql://edgecam_test:edgecam_test@127.0.0.1:5432/edgecam_test"
)


def fresh_database(admin_url: str) -> tuple[str, str]:
    name = f"edgecam_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}", name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def preload_day(url: str) -> str:
    """24 h of 1 s stats of one device, and a user token; the token."""
    engine = db.make_engine(url)
    db.migrate(engine)
    store = Store(engine)
    end = time.time()
    for i in range(0, DAY, 5000):
        store.write(
            [(DAY_DEVICE, make_stats(DAY_DEVICE, s, end - DAY + s)) for s in range(i, i + 5000)]
        )
    auth.create_user(engine, "bench", "bench password")
    token = auth.create_token(engine, "bench", "bench")[1]
    store.close()
    return token


def publisher(
    port: int,
    prefix: str,
    devices: list[str],
    rate: float,
    seconds: float,
    q: mp.Queue,  # type: ignore[type-arg]
    limit: int | None = None,
) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    seq = dict.fromkeys(devices, 0)
    sent = 0
    info = None
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate)  # a fixed rate: catch up to where the clock says
        if limit is not None:
            due = min(due, limit)
            if sent >= limit:
                break
        while sent < due:
            device = devices[sent % len(devices)]
            msg = make_stats(device, seq[device], time.time())
            seq[device] += 1
            info = client.publish(topic(prefix, device, "stats"), msg.model_dump_json(), qos=1)
            sent += 1
        time.sleep(0.005)
    if info is not None:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    q.put((sent, elapsed))


def count_load(url: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(db.StatsRow)
                    .where(db.StatsRow.device != DAY_DEVICE)
                )
                or 0
            )
    finally:
        engine.dispose()


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class ApiProbe(threading.Thread):
    """Asks for the day device's last 24 h again and again, timing each answer."""

    def __init__(self, base: str, token: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        self.bucketed: list[float] = []
        self.raw: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            now = time.time()
            raw = n % 5 == 4  # one raw query (86,400 rows) in five
            query = f"/api/devices/{DAY_DEVICE}/stats?start={now - DAY}&end={now}"
            t0 = time.perf_counter()
            r = self.client.get(query if raw else query + "&bucket=60")
            took = (time.perf_counter() - t0) * 1000
            r.raise_for_status()
            (self.raw if raw else self.bucketed).append(took)
            n += 1
            self.stop.wait(0.1)


def time_to_chart(base: str) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        return {}
    out: dict[str, float] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page()
        page.goto(f"{base}/login")
        page.fill("input[name=username]", "bench")
        page.fill("input[name=password]", "bench password")
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")
        for label in ("1 h", "24 h"):
            t0 = time.perf_counter()
            page.goto(f"{base}/devices/{DAY_DEVICE}")
            if label != "1 h":
                page.wait_for_selector("#chart[data-drawn-ms]")
                t0 = time.perf_counter()
                page.evaluate("() => { document.getElementById('chart').dataset.points = '0'; }")
                page.click(f"button.range:text-is('{label}')")
            page.wait_for_function("() => document.getElementById('chart').dataset.points !== '0'")
            out[label] = (time.perf_counter() - t0) * 1000
            if label == "1 h":
                out["1 h (navigation start to drawn)"] = float(
                    page.evaluate("() => Number(document.getElementById('chart').dataset.drawnMs)")
                )
        browser.close()
    return out


def drain_backlog(
    args: argparse.Namespace,
    pid: int,
    port: int,
    prefix: str,
    devices: list[str],
    url: str,
    before: int,
) -> dict[str, float]:
    """Ingest capacity without publishers competing for the CPU: the ingest processes are
    stopped (SIGSTOP) while ``--backlog`` messages pile up in the broker, then continued;
    the time until all are in the database gives the drain rate."""
    if args.backlog <= 0:
        return {}
    server = psutil.Process(pid)
    children = [c for c in server.children() if "resource_tracker" not in " ".join(c.cmdline())]
    ingest = children or [server]  # one ingest runs inside the server process
    for proc in ingest:
        proc.suspend()
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    share = [devices[i :: args.publishers] for i in range(args.publishers)]
    each = args.backlog // args.publishers
    pubs = [  # as fast as they can: the ingest is not running
        mp.Process(target=publisher, args=(port, prefix, part, 1e9, 600, q, each)) for part in share
    ]
    for proc in pubs:
        proc.start()
    sent = sum(q.get()[0] for _ in pubs)
    for proc in pubs:
        proc.join()
    t0 = time.perf_counter()
    for proc in ingest:
        proc.resume()
    stored = before
    while time.perf_counter() - t0 < 300:
        stored = count_load(url)
        if stored >= before + sent:
            break
        time.sleep(0.1)
    took = time.perf_counter() - t0
    return {
        "backlog_sent": sent,
        "backlog_lost": before + sent - stored,
        "backlog_drain_rate": (stored - before) / took,
    }


def run_once(args: argparse.Namespace, processes: int, work: Path) -> dict[str, object]:
    url, dbname = fresh_database(args.pg)
    broker, port = _common.start_broker(work)
    server = None
    try:
        t0 = time.perf_counter()
        token = preload_day(url)
        print(f"  preloaded 86,400 stats of {DAY_DEVICE} in {time.perf_counter() - t0:.1f} s")
        http_port = free_port()
        prefix = "bench"
        config = work / f"server-{processes}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "mqtt": {
                        "host": "127.0.0.1",
                        "port": port,
                        "prefix": prefix,
                        "keepalive_s": 300,  # stays connected while stopped for the backlog
                    },
                    "server": {
                        "port": http_port,
                        "database_url": url,
                        "clips_dir": str(work / "clips"),
                        "ingest_processes": processes,
                        "batch_size": 2000,
                        "batch_interval_s": 0.1,
                        "secure_cookies": False,
                    },
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        server = subprocess.Popen(
            [sys.executable, "-m", "edgecam.cli", "server", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{http_port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(1.0)  # ingest subscriptions
        probe = ApiProbe(base, token)
        probe.start()
        devices = [f"dev-{i:04d}" for i in range(args.devices)]
        q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        share = [devices[i :: args.publishers] for i in range(args.publishers)]
        pubs = [
            mp.Process(
                target=publisher,
                args=(port, prefix, part, args.rate / args.publishers, args.seconds, q),
            )
            for part in share
        ]
        start = time.perf_counter()
        for proc in pubs:
            proc.start()
        results = [q.get() for _ in pubs]
        for proc in pubs:
            proc.join()
        published_at = time.perf_counter()
        sent = sum(r[0] for r in results)
        stored = 0
        while time.perf_counter() - published_at < 120:
            stored = count_load(url)
            if stored >= sent:
                break
            time.sleep(0.2)
        done = time.perf_counter()
        probe.stop.set()
        probe.join()
        chart = time_to_chart(base) if args.browser else {}
        backlog = drain_backlog(args, server.pid, port, prefix, devices, url, stored)
        return {
            "processes": processes,
            "sent": sent,
            "stored": stored,
            "lost": sent - stored,
            "offered_rate": sent / max(r[1] for r in results),
            "ingest_rate": stored / (done - start),
            "drain_s": done - published_at,
            "api_bucketed_p50": statistics.median(probe.bucketed) if probe.bucketed else 0,
            "api_bucketed_p95": p(probe.bucketed, 0.95),
            "api_raw_p50": statistics.median(probe.raw) if probe.raw else 0,
            "api_raw_p95": p(probe.raw, 0.95),
            "api_n": len(probe.bucketed) + len(probe.raw),
            "chart": chart,
            **backlog,
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        broker.terminate()
        broker.wait(timeout=10)
        drop_database(args.pg, dbname)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5000, help="messages a second, in all")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--processes", default="1,2", help="ingest processes to try")
    parser.add_argument("--publishers", type=int, default=2, help="publishing processes")
    parser.add_argument(
        "--pg", default=PG_DEFAULT, help="PostgreSQL URL allowed to CREATE DATABASE"
    )
    parser.add_argument("--no-browser", dest="browser", action="store_false")
    parser.add_argument(
        "--backlog", type=int, default=60_000, help="messages for the drain phase (0: none)"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecam-bench-fleet-") as tmp:
        for n in [int(x) for x in args.processes.split(",")]:
            print(f"ingest processes: {n} ({args.devices} devices, {args.rate:g} msg/s offered)")
            row = run_once(args, n, Path(tmp))
            print(f"  {row}")
            rows.append(row)
    print()
    print(
        "| ingest processes | sent | stored | lost | offered msg/s | ingested msg/s "
        "| drain after publish (s) | API 24 h per-minute p50 / p95 (ms) "
        "| API 24 h raw p50 / p95 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r["processes"],
            f"{r['sent']:,}",
            f"{r['stored']:,}",
            r["lost"],
            f"{r['offered_rate']:,.0f}",
            f"{r['ingest_rate']:,.0f}",
            f"{r['drain_s']:.1f}",
            f"{r['api_bucketed_p50']:.0f} / {r['api_bucketed_p95']:.0f}",
            f"{r['api_raw_p50']:.0f} / {r['api_raw_p95']:.0f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for r in rows:
        chart: dict[str, float] = r["chart"]  # type: ignore[assignment]
        if chart:
            times = ", ".join(f"{k}: {v:.0f} ms" for k, v in chart.items())
            print(f"device page, time to first chart ({r['processes']} ingest): {times}")
    for r in rows:
        if "backlog_sent" in r:
            print(
                f"backlog drain ({r['processes']} ingest): {r['backlog_sent']:,} messages, "
                f"{r['backlog_drain_rate']:,.0f} msg/s, lost {r['backlog_lost']}"
            )


if __name__ == "__main__":
    main()
