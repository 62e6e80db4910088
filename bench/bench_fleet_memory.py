"""Fleet server memory after bursts of large alerts: what it holds once they are stored.

A Mosquitto of its own, the fleet server's real parts (ingest, HTTP, retention; SQLite, the
default config) in this process, and a publisher process sending ``--alerts`` alerts of
``--size`` characters at QoS 1 as fast as the broker takes them, one burst after another.
After each burst is stored (counted in the database) and 2 s of quiet, it prints this
process's RSS and what SQLite holds by its own count (``sqlite3_memory_used``, every
connection); at the end, the RSS once ``malloc_trim(0)`` has given back the free memory
glibc can (what is left is held by live objects, not fragmentation).

    .venv/bin/python bench/bench_fleet_memory.py [--alerts 10000] [--size 65000] [--bursts 2]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from edgecam.config import Settings
from edgecam.heap import release_free_memory
from edgecam.ports import free_port
from edgecam.protocol import Alert, topic
from edgecam.server import db
from edgecam.server.app import BackgroundServer

DEVICE = "cam-1"
PREFIX = "bench"
# Publishes in flight before the publisher waits for the broker's acknowledgements.
WINDOW = 500


def publish_alerts(port: int, count: int, size: int) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    pending: list[mqtt.MQTTMessageInfo] = []
    for _ in range(count):
        alert = Alert(
            device=DEVICE,
            alert_id=secrets.token_hex(16),
            rule="no_mask",
            state="raised",
            message="x" * size,
            started=time.time(),
        )
        pending.append(client.publish(topic(PREFIX, DEVICE, "alerts"), alert.model_dump_json(), 1))
        if len(pending) >= WINDOW:
            for info in pending:
                info.wait_for_publish(120)
            pending.clear()
    for info in pending:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def sqlite_bytes() -> int:
    """Bytes SQLite holds in this process (every connection), by its own count."""
    spec = importlib.util.find_spec("_sqlite3")
    assert spec is not None and spec.origin is not None
    lib = ctypes.CDLL(spec.origin)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


def rss_bytes() -> int:
    return c.proc_status_kb("VmRSS") * 1024


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=10_000, help="alerts in each burst")
    parser.add_argument("--size", type=int, default=65_000, help="characters of each message")
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--publish-to", type=int, help=argparse.SUPPRESS)  # the publisher
    args = parser.parse_args()
    if args.publish_to is not None:
        publish_alerts(args.publish_to, args.alerts, args.size)
        return
    print(c.machine_note())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker, port = c.start_broker(work)
        url = f"sqlite:///{work / 'server.db'}"
        settings = Settings.model_validate(
            {
                "mqtt": {"host": "127.0.0.1", "port": port, "prefix": PREFIX},
                "server": {
                    "port": free_port(),
                    "database_url": url,
                    "clips_dir": str(work / "clips"),
                },
            }
        )
        server = BackgroundServer(settings).start()
        engine = db.make_engine(url)
        try:
            time.sleep(1.0)  # ingest subscribed
            print(f"start: RSS {mb(rss_bytes())}")
            stored = 0
            for burst in range(1, args.bursts + 1):
                start = time.perf_counter()
                # A process of its own, so that what it allocates is not counted here.
                publish = [f"--publish-to={port}", f"--alerts={args.alerts}", f"--size={args.size}"]
                subprocess.run([sys.executable, __file__, *publish], check=True)
                stored += args.alerts
                while True:
                    with engine.connect() as conn:
                        if conn.scalar(select(func.count()).select_from(db.Alert)) >= stored:
                            break
                    time.sleep(0.2)
                took = time.perf_counter() - start
                time.sleep(2.0)
                print(
                    f"burst {burst}: {stored} alerts stored ({took:.1f} s); "
                    f"RSS {mb(rss_bytes())}, "
                    f"SQLite holds {mb(sqlite_bytes())}"
                )
            release_free_memory()
            print(f"after malloc_trim(0): RSS {mb(rss_bytes())}")
        finally:
            engine.dispose()
            server.stop()
            broker.terminate()
            broker.wait(timeout=10)


if __name__ == "__main__":
    main()
