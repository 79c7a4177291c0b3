"""The Sphinx site in ``docs/`` builds without warnings and its snippets run."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCE = DOCS / "source"
SNIPPETS = sorted((DOCS / "snippets").glob("*.py"))
METHOD_PAGES = ("cotap", "semantic_pairs", "dsa", "cossl", "bagssl")


def test_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    # A subprocess: autodoc imports lightly_cotap.mmseg, which patches mmcv.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(SOURCE),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    html = tmp_path / "html"
    for page in METHOD_PAGES:
        assert (html / "methods" / f"{page}.html").is_file()
    for page in ("evaluation", "mmseg", "benchmarks", "api"):
        assert (html / f"{page}.html").is_file()
    loss_api = (html / "api" / "lightly_cotap.loss.html").read_text()
    assert 'id="lightly_cotap.loss.ContinuousAPLoss"' in loss_api


def test_every_method_page_includes_its_snippet() -> None:
    assert [path.stem for path in SNIPPETS] == sorted(METHOD_PAGES)
    for page in METHOD_PAGES:
        text = (SOURCE / "methods" / f"{page}.rst").read_text()
        assert f".. literalinclude:: ../../snippets/{page}.py" in text
        assert ".. figure::" in text


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda path: path.stem)
def test_snippet_runs_and_backpropagates(snippet: Path) -> None:
    namespace = runpy.run_path(str(snippet), run_name="__main__")
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor)
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    assert loss.grad_fn is not None


def _readme_tables() -> list[list[list[str]]]:
    """Every markdown table of the README as rows of stripped cells."""
    tables: list[list[list[str]]] = []
    previous_was_table = False
    for line in (ROOT / "README.md").read_text().splitlines():
        is_table = line.startswith("|")
        if is_table and not re.fullmatch(r"[|\-: ]+", line):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not previous_was_table:
                tables.append([])
            tables[-1].append(cells)
        previous_was_table = is_table
    return tables


def _docs_tables(page: Path) -> list[list[list[str]]]:
    """The ``csv-table`` directives (``:delim: |``) of a page, in markdown form."""
    tables = []
    for block in page.read_text().split(".. csv-table::")[1:]:
        body = block.split("\n\n", 1)[1]
        rows = []
        for line in body.splitlines():
            if not line.startswith("   "):
                break
            cells = [cell.strip() for cell in line.split("|")]
            # rst literals and escapes back to the README's markdown
            cells = [re.sub(r"``([^`]+)``", r"`\1`", c) for c in cells]
            rows.append([c.replace("\\(", "(") for c in cells])
        tables.append(rows)
    return tables


def test_benchmark_tables_are_the_readme_tables() -> None:
    readme = _readme_tables()
    docs = _docs_tables(SOURCE / "benchmarks.rst")
    assert len(docs) == 8
    for table in docs:
        assert table in readme, table[0]


def test_figure_script_draws_every_method_figure(tmp_path: Path) -> None:
    namespace = runpy.run_path(str(DOCS / "make_figures.py"))
    namespace["main"](["--out", str(tmp_path)])
    for name in ("semantic_pairs", "dsa", "cossl", "bagssl"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert min(image.size) >= 128
        assert (SOURCE / "_static" / "figures" / f"{name}.png").is_file()
