"""Render the executed stage notebooks to HTML and write ``reports/html/index.html``.

    python -m lib.report.html [--root .]

Every executed notebook in ``reports/notebooks/`` becomes ``reports/html/<name>.html``
(nbconvert, figures embedded as data URIs so a page is one self-contained file), and the
index links them in stage order above the headline and claims tables that stage 08 wrote
to ``reports/tables/``. Runs after the stage-07 notebook, so the report page is included.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import pandas as pd

from lib.core.stages import STAGES

VERDICT_CLASS = {"held": "held", "did not hold": "not-held", "inconclusive": "inconclusive", "not measured": "not-measured"}

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.held { background: #d9f2d9; } td.not-held { background: #f8d7d7; } td.inconclusive { background: #fff2cc; } td.not-measured { background: #eeeeee; }
ol.stages li { margin: 0.3em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def render_notebooks(root: Path) -> list[Path]:
    """Each executed notebook, in stage order, to one self-contained HTML page."""
    from nbconvert import HTMLExporter
    import nbformat

    src, dst = root / "reports" / "notebooks", root / "reports" / "html"
    dst.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    pages = []
    for stage in sorted(STAGES.values(), key=lambda s: s.notebook):  # notebooks are numbered by stage
        nb_path = src / stage.notebook
        if not nb_path.is_file():
            continue
        body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
        page = dst / (nb_path.stem + ".html")
        page.write_text(body, encoding="utf-8")
        pages.append(page)
    return pages


def _table(df: pd.DataFrame, verdict_col: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            cls = f' class="{VERDICT_CLASS.get(r[c], "")}"' if c == verdict_col else ""
            cells.append(f"<td{cls}>{html.escape('' if pd.isna(r[c]) else str(r[c]))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _title(page: Path) -> str:
    number, _, name = page.stem.partition("_")
    return f"{number} · {name.replace('_', ' ')}"


def write_index(root: Path, pages: list[Path]) -> Path:
    tables = root / "reports" / "tables"
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Skill experts workbook: report</title>",
             f"<style>{STYLE}</style></head><body>",
             "<h1>Skill experts workbook: report</h1>",
             "<p>Every number below was computed by <code>dvc repro</code> from <code>params.yaml</code>; "
             "each stage's executed notebook is linked in pipeline order.</p>",
             "<h2>Stages</h2><ol class='stages'>"]
    parts += [f"<li><a href='{p.name}'>{html.escape(_title(p))}</a></li>" for p in pages]
    parts.append("</ol>")
    for name, title, col, note in (
            ("headline.csv", "Headline", None, "Mean exact-match accuracy over the training skills with 95% bootstrap "
                                               "intervals; normalised = accuracy / the skill's own expert's accuracy."),
            ("claims.csv", "Published claims, tested here", "verdict",
             "Verdict rule: held when the measured 95% interval and the comparison's interval do not overlap in the "
             "claimed order, did not hold when they do not overlap in the other order, inconclusive otherwise; "
             "not measured when the run lacks an input (lib/report/claims.py).")):
        path = tables / name
        parts.append(f"<h2>{title}</h2>")
        if path.is_file():
            df = pd.read_csv(path, keep_default_na=False)
            parts += [f"<p class='note'>{html.escape(note)}</p>", _table(df.drop(columns=["key"], errors="ignore"), col)]
        else:
            parts.append(f"<p class='note'>{html.escape(str(path))} is missing: run stage 08 (dvc repro report).</p>")
    parts.append("</body></html>")
    index = root / "reports" / "html" / "index.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


def build(root: str | Path = ".") -> Path:
    root = Path(root).resolve()
    return write_index(root, render_notebooks(root))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    print(build(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
