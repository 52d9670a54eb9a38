"""Settings: typed, from an explicit environment, failing at start-up with a sentence."""

from __future__ import annotations

import attrs
import pytest

from dialog_api.settings import WorkerSettings
from dialogs.settings import SettingsError, load
from proxy.settings import MigrationRunnerSettings, ProxySettings

INTERNAL = {"DIALOGS_INTERNAL_SECRET": "i" * 32}
PROXY = {"DIALOGS_METADATA_DSN": "postgresql://u@h/db", "DIALOGS_JWT_SECRET": "s" * 32, **INTERNAL}
WORKER = {
    **INTERNAL,
    "DIALOGS_SHARD_ID": "shard-1",
    "DIALOGS_SHARD_DSN": "postgresql://u@h/shard",
    "DIALOGS_METADATA_DSN": "postgresql://u@h/meta",
}


def test_defaults_and_overrides() -> None:
    """Unset variables take documented defaults; set ones are converted to their types."""
    settings = load(ProxySettings, {**PROXY, "DIALOGS_PORT": "9090"})
    assert settings.port == 9090 and settings.max_text_length == 4096 and settings.host == "127.0.0.1"
    worker = load(WorkerSettings, {**WORKER, "DIALOGS_PORT": "8100"})
    assert worker.url == "http://127.0.0.1:8100"


def test_settings_are_frozen() -> None:
    """Nothing changes settings after start-up."""
    settings = load(ProxySettings, PROXY)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIALOGS_JWT_SECRET": "s" * 32, **INTERNAL}, "DIALOGS_METADATA_DSN"),
        ({**PROXY, "DIALOGS_INTERNAL_SECRET": "short"}, "DIALOGS_INTERNAL_SECRET must be at least 32"),
        ({**PROXY, "DIALOGS_PORT": "http"}, "DIALOGS_PORT must be a TCP port"),
        ({**PROXY, "DIALOGS_PORT": "70000"}, "DIALOGS_PORT must be a TCP port"),
        ({**PROXY, "DIALOGS_JWT_SECRET": "short"}, "at least 32 characters"),
        ({**PROXY, "DIALOGS_METADATA_DSN": "mysql://x"}, "postgresql://"),
        ({**PROXY, "DIALOGS_FORWARD_TIMEOUT": "-1"}, "positive number"),
        # Above the wire's ceiling, workers would refuse what the proxy accepted.
        ({**PROXY, "DIALOGS_MAX_TEXT_LENGTH": "65537"}, "DIALOGS_MAX_TEXT_LENGTH must be an integer from 1 to 65536"),
    ],
)
def test_bad_proxy_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    """A missing or malformed variable is one SettingsError that says which and why."""
    with pytest.raises(SettingsError, match=message):
        load(ProxySettings, env)


def test_a_refused_secret_is_never_repeated() -> None:
    """A secret one character short is named with its length, never its value (it would end
    up in the logs)."""
    almost = "a-real-secret-one-character-shor"[:31]
    with pytest.raises(SettingsError) as raised:
        load(ProxySettings, {**PROXY, "DIALOGS_JWT_SECRET": almost})
    assert "DIALOGS_JWT_SECRET must be at least 32 characters, got 31 characters" in str(raised.value)
    assert almost not in str(raised.value)


def test_workers_need_the_internal_secret() -> None:
    """A worker without the proxies' secret does not start: its API would trust anyone."""
    with pytest.raises(SettingsError, match="DIALOGS_INTERNAL_SECRET"):
        load(WorkerSettings, {k: v for k, v in WORKER.items() if k != "DIALOGS_INTERNAL_SECRET"})


def test_bad_shard_id_is_refused() -> None:
    """Shard ids are checked like the admin API checks them."""
    with pytest.raises(SettingsError, match="DIALOGS_SHARD_ID must be a shard id"):
        load(WorkerSettings, {**WORKER, "DIALOGS_SHARD_ID": "Shard One"})


def test_a_separate_migration_runner_reads_the_proxies_migration_settings() -> None:
    """`dialogs run-migration` honours DIALOGS_CUTOVER_DEADLINE and DIALOGS_WORKER_TTL like a proxy."""
    env = {
        "DIALOGS_METADATA_DSN": "postgresql://u@h/meta",
        "DIALOGS_CUTOVER_DEADLINE": "2.5",
        "DIALOGS_WORKER_TTL": "4",
    }
    settings = load(MigrationRunnerSettings, env)
    assert (settings.cutover_deadline, settings.worker_ttl) == (2.5, 4.0)
    with pytest.raises(SettingsError, match="DIALOGS_CUTOVER_DEADLINE"):
        load(MigrationRunnerSettings, {**env, "DIALOGS_CUTOVER_DEADLINE": "soon"})
