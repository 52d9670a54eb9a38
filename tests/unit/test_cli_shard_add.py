"""`dialogs shard add`'s options (and `dialogs up`'s environment), refused before anything is started or asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dialogsctl.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The local cluster registers its own members: a server started for nothing otherwise.
        (["--patroni", "http://a:8008"], "--patroni goes with --dsn"),
        (["shard-3", "--dsn", "postgresql://x@h/db", "--patroni", "a:8008"], "--patroni must be a list of http(s)"),
        (["shard-3", "--dsn", "postgresql://x@h/db", "--patroni", " , "], "--patroni: no URL given"),
    ],
)
def test_patroni_members_are_checked_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["shard", "add", *args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []  # no cluster.json, no server folder


@pytest.mark.parametrize("command", [["up"], ["shard", "add"]])
def test_commands_that_start_servers_refuse_a_malformed_port_range_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    data_dir = tmp_path / "cluster"
    result = CliRunner().invoke(main, [*command, "--data-dir", str(data_dir)], env={"DIALOGS_PORT_RANGE": "9000"})
    assert result.exit_code == 2, result.output
    assert result.output == (
        "Error: DIALOGS_PORT_RANGE must be LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, not '9000'\n"
    )
    assert not data_dir.exists()  # no cluster.json, no server folder


def test_a_command_that_starts_no_server_ignores_the_port_range(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["admin-token", "--data-dir", str(tmp_path)], env={"DIALOGS_PORT_RANGE": "x"})
    assert "DIALOGS_PORT_RANGE" not in result.output  # it says there is no cluster here instead
    assert "no local cluster" in result.output
