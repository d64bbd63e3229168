"""The README's configuration table, generated from the settings so the two never drift."""
from __future__ import annotations

from shared.settings import documented_settings

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def settings_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for s in documented_settings():
        default = "unset" if s.default is None else f"`{s.default}`"
        lines.append(f"| `{s.env}` | {default} | {s.help.replace('|', '/')} |")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    """``text`` with the table between the markers replaced by the current one."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"
