"""Schemathesis over the OpenAPI schema: no generated request makes the server fail (5xx)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from server_support import FleetServer, server_settings

from edgecam.server.simulate import SimDevice

EXAMPLES = 25


@pytest.fixture
def sqlite_fleet(broker: int, prefix: str, tmp_path: Path) -> Iterator[FleetServer]:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    server = FleetServer(server_settings(url, broker, prefix, tmp_path))
    yield server
    server.close()


def test_no_generated_request_gets_a_server_error(
    sqlite_fleet: FleetServer, broker: int, prefix: str
) -> None:
    fleet = sqlite_fleet
    device = SimDevice("cam-1", "127.0.0.1", broker, prefix).start()
    schema = schemathesis.openapi.from_dict(fleet.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    # Revoking tokens last: the fuzzer may well revoke the one it uses.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    assert len(operations) >= 12
    failures: list[str] = []
    statuses: list[int] = []
    try:
        for operation in operations:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy())
            def check(case: schemathesis.Case) -> None:
                response = case.call(
                    base_url=fleet.url,
                    headers={"Authorization": f"Bearer {fleet.token}"},
                    timeout=30,
                )
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")

            check()
    finally:
        device.stop()
    assert not failures, failures
    assert len(statuses) >= 5 * len(operations)
    assert any(200 <= s < 300 for s in statuses)
