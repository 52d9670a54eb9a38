"""Schemathesis over the service's own OpenAPI document: no 5xx, every response as documented."""

from __future__ import annotations

import asyncio
import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from proxy.openapi import document
from tests.support import ADMIN_TOKEN, Cluster

pytestmark = pytest.mark.timeout(300)

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
# Cases per operation and generation mode: enough to find the classic 500s (types, sizes,
# encodings, missing fields), few enough to keep the suite fast. Derandomised, so that a
# failure in CI is the same failure on a laptop.
EXAMPLES = 40
# It would connect to whatever DSN it is given; its validation is tested in test_admin_api.
SKIPPED = {("POST", "/admin/shards")}


def _fuzz(base_url: str, user_token: str) -> collections.Counter[str]:
    schema = schemathesis.openapi.from_dict(document())
    seen: collections.Counter[str] = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        token = ADMIN_TOKEN if operation.path.startswith("/admin") else user_token
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                # Called right below, in this iteration: the loop variable is the current one.
                headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}  # noqa: B023
                response = case.call(base_url=base_url, headers=headers, timeout=15)
                seen[f"{case.method} {case.path} {response.status_code}"] += 1
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid: an operation without parameters or body.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return seen


async def test_fuzzing_finds_no_server_error_and_no_undocumented_response(cluster: Cluster) -> None:
    """Hundreds of generated valid and invalid requests on every operation of a healthy
    cluster: no 5xx at all (not even a 503: nothing here is down), and every status, header
    and body matches the OpenAPI document."""
    _, token = await cluster.api.user("Fuzz")
    seen = await asyncio.to_thread(_fuzz, cluster.proxy_urls[0], token)
    statuses: collections.Counter[str] = collections.Counter()
    for key, count in seen.items():
        statuses[key.rsplit(" ", 1)[1]] += count
    print(f"fuzzed {sum(seen.values())} requests; statuses {dict(sorted(statuses.items()))}")
    for key, count in sorted(seen.items()):
        print(f"  {count:4d}  {key}")
    assert sum(seen.values()) > 300
    assert not any(status.startswith("5") for status in statuses), statuses
