"""Prometheus HTTP service discovery from the registrations the metadata database holds.

``GET /discovery/prometheus?role=proxy|worker|patroni`` answers in Prometheus'
``http_sd_configs`` format: one target group with the host:port of every live proxy
process or worker, or of every Patroni member of a replicated shard or metadata database
(their REST API serves Patroni's own metrics). A worker of a shard added at runtime, the
members of a replicated one, or a proxy process restarted on a new port, is scraped
within one refresh, with no edit to prometheus.yml. When the metadata database is
down the answer is a 503 and Prometheus keeps its last targets.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from dialogs import errors
from dialogs.http import json_response
from proxy.appkeys import METADATA, SETTINGS

ROLES = ("proxy", "worker", "patroni")


async def prometheus_targets(request: web.Request) -> web.Response:
    role = request.query.get("role", "")
    if role not in ROLES:
        raise errors.InvalidInput(f"role must be one of: {', '.join(ROLES)}")
    store = request.app[METADATA]
    if role == "patroni":
        urls = await store.patroni_targets()
    else:
        urls = await store.live_urls(role, request.app[SETTINGS].worker_ttl)
    groups: dict[str, set[str]] = {}
    for url in urls:  # a Patroni REST API may be https: Prometheus is told per group
        parts = urlsplit(url)
        groups.setdefault(parts.scheme, set()).add(parts.netloc)
    return json_response(
        [
            {"targets": sorted(targets), "labels": {} if scheme == "http" else {"__scheme__": scheme}}
            for scheme, targets in sorted(groups.items())
        ]
    )
