"""The README and the Procfile stay true to the code."""
from __future__ import annotations

from pathlib import Path

from shared.docs import render_readme

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_matches_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme) == readme, (
        "README's configuration table is stale: run `steprun settings --write-readme README.md`"
    )


def test_readme_shows_the_procfile_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in (ROOT / "Procfile").read_text().splitlines():
        assert line in readme, f"Procfile line missing from README: {line}"
