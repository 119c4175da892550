"""The README works as written: every ```python block runs, and the recipes table lists every shipped recipe."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

import dropblock_inject as dbi

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a markdown text, with the line number of each opening fence."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks(TEXT)


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 6  # quick start, the three training loops, the op, the pictures
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n") == [(2, "a = 1\n")]


@pytest.fixture
def _isolated(tmp_path, monkeypatch, caplog):
    """Run in an empty directory (files the snippets write land there), quietly, on one thread."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_written(_isolated, line, code):
    for module in re.findall(r"^(?:import|from) (lightning|transformers|matplotlib|onnx)\b", code, flags=re.M):
        pytest.importorskip(module)  # the optional extras; the dev extra has them all
    if "plot_masks" in code:
        pytest.importorskip("skimage")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102


def _recipes_table(text: str) -> dict[str, str]:
    section = text[text.index("\n## Recipes\n"):]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (.*) \|$", section.split("\n## ", 2)[1], flags=re.M)
    return dict(rows)


def test_recipes_table_lists_every_shipped_recipe_with_its_description():
    table = _recipes_table(TEXT)
    assert sorted(table) == dbi.available_recipes()
    for name, text in table.items():
        assert text == dbi.load_recipe(name).description, f"README row of {name!r} differs from the recipe's"


def test_readme_links_the_coverage_report():
    assert "(docs/coverage.md)" in TEXT
    assert (README.parent / "docs" / "coverage.md").is_file()
