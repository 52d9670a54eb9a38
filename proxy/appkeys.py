"""Typed keys for the proxy app's state."""

from __future__ import annotations

from aiohttp import web

from dialogs.metastore.store import MetadataStore
from dialogs.watch import MetadataWatcher
from proxy.auth import Passwords, TokenAuthority
from proxy.forwarder import Forwarder
from proxy.login_guard import LoginGuard
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from proxy.topology import Topology
from proxy.users import KnownUsers

SETTINGS = web.AppKey("settings", ProxySettings)
METRICS = web.AppKey("metrics", ProxyMetrics)
TOKENS = web.AppKey("tokens", TokenAuthority)
PASSWORDS = web.AppKey("passwords", Passwords)
LOGIN_GUARD = web.AppKey("login_guard", LoginGuard)
METADATA = web.AppKey("metadata", MetadataStore)  # every query of the metadata database
KNOWN_USERS = web.AppKey("known_users", KnownUsers)
TOPOLOGY = web.AppKey("topology", Topology)
WATCHER = web.AppKey("watcher", MetadataWatcher)
FORWARDER = web.AppKey("forwarder", Forwarder)
OWN_URL = web.AppKey("own_url", str)  # reaches this process alone: its registration
PROXY_ID = web.AppKey("proxy_id", str)  # its registration
