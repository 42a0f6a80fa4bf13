"""README.md's option table of train-cnn, written from the CLI so that it documents what the CLI really
offers: `python -m featurepipe.docs_table README.md` (tests/test_options.py fails when they disagree).
Nothing at run time imports this module: it imports the CLI, which imports everything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

TABLE_START = "<!-- train-cnn options: written by `python -m featurepipe.docs_table README.md` -->"
TABLE_END = "<!-- end of train-cnn options -->"


def option_rows(command) -> list[tuple[str, str, str]]:
    """(option, default, help) for each option of a Click command (`typer.main.get_command`), as its
    --help shows them."""
    rows = []
    for p in command.params:
        if not p.opts or p.name == "help":
            continue
        name = " / ".join([*p.opts, *p.secondary_opts])
        if p.required:
            default = "required"
        elif isinstance(p.show_default, str):  # a default that is a word, not a value (--amp's auto)
            default = p.show_default
        elif p.default is None or p.show_default is False:
            default = "–"
        elif getattr(p, "is_bool_flag", False) and p.secondary_opts:
            default = p.opts[0] if p.default else p.secondary_opts[0]
        else:
            default = str(p.default)
        rows.append((name, default, p.help or ""))
    return rows


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| option | default | what it does |", "|---|---|---|"]
    lines += [f"| `{name}` | {f'`{default}`' if default not in ('required', '–') else default} | "
              f"{help.replace('|', '&#124;')} |" for name, default, help in rows]
    return "\n".join(lines)


def readme_rows(text: str) -> list[tuple[str, str, str]]:
    """The rows of the table between TABLE_START and TABLE_END in README.md's text."""
    block = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0] if TABLE_START in text else ""
    rows = []
    for line in [line for line in block.splitlines() if line.startswith("|")][2:]:  # after header and rule
        name, default, help = (c.strip() for c in line.strip().strip("|").split(" | "))
        rows.append((name.strip("`"), default.strip("`"), help.replace("&#124;", "|")))
    return rows


def _train_cnn_table() -> str:
    import typer

    from featurepipe.cli import app

    return markdown_table(option_rows(typer.main.get_command(app).commands["train-cnn"]))


def write_readme_table(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{path}: no {TABLE_START} ... {TABLE_END} block to write the table into")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_START}\n{_train_cnn_table()}\n{TABLE_END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write_readme_table(Path(sys.argv[1]))
    else:
        print(_train_cnn_table())
