"""The README's configuration tables, generated from the settings classes.

``python -m dialogsctl.settings_doc`` rewrites every block of README.md between
``<!-- settings: NAME -->`` and ``<!-- /settings -->``; ``tests/unit/test_settings_doc.py``
fails when the README and the declarations drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from dialog_api.settings import WorkerSettings
from dialogs.settings import markdown_table
from proxy.settings import BootstrapSettings, MigrationRunnerSettings, ProxySettings

TABLES = {
    "proxy": ProxySettings,
    "worker": WorkerSettings,
    "run-migration": MigrationRunnerSettings,
    "bootstrap": BootstrapSettings,
}
README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- settings: (?P<name>[\w-]+) -->\n).*?(<!-- /settings -->)", re.S)


def render(readme: str) -> str:
    """``readme`` with every settings block regenerated."""

    def table(match: re.Match[str]) -> str:
        return f"{match[1]}{markdown_table(TABLES[match['name']])}\n{match[3]}"

    return _BLOCK.sub(table, readme)


def main() -> int:
    text = README.read_text()
    README.write_text(render(text))
    print(f"rewrote the settings tables of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
