"""C load generators, so that the client does not eat the CPU the service needs.

- ``wrk`` (Debian's package, installed when missing) drives HTTP: a Lua script cycles
  through prepared requests (many dialogs, many tokens), and the result is parsed from
  wrk's own summary.
- ``pgbench`` (shipped in the embedded PostgreSQL wheel) drives SQL baselines with a
  custom script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from dialogsctl import pg_home


@dataclass(frozen=True)
class Load:
    """What a run measured: requests per second, latency quantiles (ms), failures."""

    per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    failed: int

    def to_json(self) -> dict[str, float | int]:
        return {
            "per_second": round(self.per_second, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "requests": self.requests,
            "failed": self.failed,
        }


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if found is None:
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    assert found is not None, "wrk is not installed (apt-get install wrk)"
    return found


_LUA = """
local requests = {}
local index = 0
local data = %s
init = function(args)
  for i, r in ipairs(data) do
    requests[i] = wrk.format(r.method, r.path, r.headers, r.body)
  end
  index = math.random(#requests)
end
request = function()
  index = index %% #requests + 1
  return requests[index]
end
done = function(summary, latency, requests_)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout + summary.errors.status
  io.write(string.format("RESULT %%d %%d %%f %%f %%f\\n", summary.requests, errors,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


def _lua_table(requests: list[dict[str, object]]) -> str:
    def lua(value: object) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"[{json.dumps(k)}] = {lua(v)}" for k, v in value.items()) + "}"
        if value is None:
            return "nil"
        return json.dumps(value)

    return "{" + ",\n".join(lua(r) for r in requests) + "}"


def wrk(url: str, requests: list[dict[str, object]], connections: int, seconds: float, threads: int = 2) -> Load:
    """Run wrk against ``url`` cycling through ``requests`` ({method, path, headers, body})."""
    binary = ensure_wrk()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % _lua_table(requests))
    try:
        result = subprocess.run(
            [
                binary,
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    finally:
        Path(script.name).unlink()
    match = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", result.stdout)
    if match is None:
        raise RuntimeError(f"wrk failed: {result.stdout}\n{result.stderr}")
    count, failed = int(match[1]), int(match[2])
    duration_s = float(match[3]) / 1e6
    return Load(count / duration_s, float(match[4]) / 1000, float(match[5]) / 1000, count, failed)


def pgbench(dsn: str, script: str, clients: int, seconds: float, variables: dict[str, str] | None = None) -> Load:
    """Run pgbench with a custom ``script`` (prepared statements) against ``dsn``."""
    binary = pg_home.WHEEL_BIN / "pgbench"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as file:
        file.write(script)
    args = [
        str(binary),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(int(seconds)),
        "-f",
        file.name,
        "-r",
    ]
    for name, value in (variables or {}).items():
        args += ["-D", f"{name}={value}"]
    try:
        result = subprocess.run(args + [dsn], capture_output=True, text=True, timeout=seconds + 60)
    finally:
        Path(file.name).unlink()
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", result.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    if tps is None or latency is None or processed is None or "aborted" in result.stderr:
        raise RuntimeError(f"pgbench failed: {result.stdout}\n{result.stderr}")
    average = float(latency[1])
    # pgbench reports the average only; with one client it is close to the median.
    return Load(float(tps[1]), average, float("nan"), int(processed[1]), int(failed[1]) if failed else 0)


class PeakRss:
    """The largest resident set size each of ``pids`` reaches while the block runs (MiB)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self.peak_mib: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        processes = {name: psutil.Process(pid) for name, pid in self._pids.items()}
        while not self._stop.is_set():
            for name, process in processes.items():
                try:
                    rss = process.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                self.peak_mib[name] = max(self.peak_mib[name], rss)
            self._stop.wait(self._interval)
