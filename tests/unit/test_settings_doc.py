"""The README's configuration tables are the settings classes' own declarations."""

from __future__ import annotations

from dialogsctl import settings_doc


def test_readme_tables_match_the_settings_classes() -> None:
    """Regenerating the tables changes nothing; run `make docs` after changing a setting."""
    readme = settings_doc.README.read_text()
    assert readme.count("<!-- settings: ") == len(settings_doc.TABLES)
    assert settings_doc.render(readme) == readme, "README tables are stale: run `make docs`"
