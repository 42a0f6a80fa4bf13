"""One document, two renderings: summary.md (figures linked) and report.html (figures embedded).

The report is built once as a list of blocks, so the Markdown and the HTML can never disagree.
The HTML is self-contained: inline CSS, PNGs as data URIs, no script, no external reference.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0 auto;
     max-width:1320px;padding:24px 24px 64px}
h1{font-size:1.6em;margin:.2em 0 .1em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:1.4em 0 .4em}p.note{color:#555;font-size:.92em;margin:.3em 0 1em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-variant-numeric:tabular-nums;font-size:.93em}
th,td{padding:4px 8px;border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap}
th{background:#f4f5f7;border-bottom:2px solid #ccc;white-space:normal;vertical-align:bottom;min-width:4em}
.l{text-align:left}td.w{white-space:normal;text-align:left;min-width:9em}
tr:hover td{background:#fafbfc}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em;margin-top:.3em}
pre{background:#f6f8fa;padding:10px 12px;overflow:auto;font-size:.85em;border-radius:4px}
details summary{cursor:pointer;color:#0b5cad;margin:.4em 0}
.row{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}.row figure{flex:1 1 420px;margin-top:0}
.takeaway{background:#f1f6fd;border-left:4px solid #0b5cad;padding:8px 14px;margin:1em 0}
.scroll{overflow-x:auto;max-width:100%}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:-1px}
"""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    colors: dict[str, str] = field(default_factory=dict)  # cell value -> swatch colour (HTML only)
    swatch_column: int = 0  # the column whose cells get the swatches
    label_columns: int = 1  # leading columns of names, left-aligned; the numbers after them align right
    wrap_columns: tuple[int, ...] = ()  # columns of words (negative: from the end) that may wrap (HTML only)


@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", text, level))

    def para(self, text: str, note: bool = False) -> None:
        self.blocks.append(("para", text, note))

    def takeaway(self, text: str) -> None:
        """The one paragraph a reader should not miss (highlighted in HTML, bold in Markdown)."""
        self.blocks.append(("takeaway", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def figure(self, path: Path, caption: str) -> None:
        """`path` must exist; Markdown links it relative to the report, HTML embeds its bytes."""
        self.blocks.append(("figure", Path(path), caption))

    def figure_row(self, figures: list[tuple[Path, str]]) -> None:
        """Figures side by side in HTML (one after the other in Markdown)."""
        self.blocks.append(("row", [(Path(p), c) for p, c in figures]))

    def code(self, text: str, summary: str | None = None) -> None:
        """Preformatted text; in HTML folded under `summary` when one is given."""
        self.blocks.append(("code", text, summary))

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, *args in self.blocks:
            if kind == "heading":
                out += ["#" * args[1] + " " + args[0], ""]
            elif kind == "para":
                out += [f"_{args[0]}_" if args[1] else args[0], ""]
            elif kind == "takeaway":
                out += [f"**{args[0]}**", ""]
            elif kind == "table":
                t = args[0]
                out.append("| " + " | ".join(t.headers) + " |")
                out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(t.headers))) + "|")
                out += ["| " + " | ".join(row) + " |" for row in t.rows]
                out.append("")
            elif kind in ("figure", "row"):
                for path, caption in args[0] if kind == "row" else [args]:
                    out += [f"![{caption}]({_relative(path, base)})", "", f"_{caption}_", ""]
            elif kind == "code":
                if args[1]:
                    out += [f"**{args[1]}**", ""]
                out += ["```", args[0].rstrip(), "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, *args in self.blocks:
            if kind == "heading":
                level = args[1]
                body.append(f"<h{level}>{e(args[0])}</h{level}>")
            elif kind == "para":
                body.append(f'<p class="note">{e(args[0])}</p>' if args[1] else f"<p>{e(args[0])}</p>")
            elif kind == "takeaway":
                body.append(f'<p class="takeaway">{e(args[0])}</p>')
            elif kind == "table":
                body.append(_html_table(args[0]))
            elif kind == "figure":
                body.append(_html_figure(*args))
            elif kind == "row":
                body.append('<div class="row">' + "".join(_html_figure(p, c) for p, c in args[0]) + "</div>")
            elif kind == "code":
                pre = f"<pre>{e(args[0].rstrip())}</pre>"
                body.append(f"<details><summary>{e(args[1])}</summary>{pre}</details>" if args[1] else pre)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{e(self.title)}</title><style>{CSS}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _html_figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_table(t: Table) -> str:
    e = html.escape
    left = set(range(t.label_columns))
    wrap = {i % len(t.headers) for i in t.wrap_columns}
    head = "".join(f'<th class="l">{e(h)}</th>' if i in left else f"<th>{e(h)}</th>" for i, h in enumerate(t.headers))
    rows = []
    for row in t.rows:
        cells = []
        for i, cell in enumerate(row):
            swatch = f'<span class="swatch" style="background:{t.colors[cell]}"></span>' \
                if i == t.swatch_column and cell in t.colors else ""
            cells.append(f'<td class="l">{swatch}{e(cell)}</td>' if i in left else
                         f'<td class="w">{e(cell)}</td>' if i in wrap else f"<td>{e(cell)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    # Wide tables scroll inside their box instead of running off the page.
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
