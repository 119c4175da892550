"""The README works as written: every ```python block runs, it stays short, the recipes table lists every shipped
recipe, and the user documentation speaks of the software as it is (no issue numbers, rounds, commits, loads)."""

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
PICTURES = README.parent / "docs" / "pictures.md"  # the viz snippet moved there from the README
DOC_BLOCKS = [("README.md", line, code) for line, code in BLOCKS] + \
    [("docs/pictures.md", line, code) for line, code in python_blocks(PICTURES.read_text(encoding="utf-8"))]


MAX_LINES = 250


def test_the_readme_is_short():
    assert TEXT.count("\n") <= MAX_LINES, "README.md is a user's first page: move details to docs/"


def test_the_readme_opens_with_the_set_up_and_test_commands():
    first_block = TEXT[TEXT.index("```bash\n") + 8:].split("```", 1)[0].splitlines()
    assert first_block[0].startswith('pip install -e ".[dev]" && python -m dropblock_inject demo')
    assert first_block[1].startswith("pytest ")
    assert TEXT.index("```bash") < TEXT.index("\n## ")  # before any section


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 5  # quick start, the plain loop (resume, accumulation, AMP), Lightning, HF, recipes
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n") == [(2, "a = 1\n")]


def test_the_api_table_names_every_public_name():
    section = TEXT[TEXT.index("\n## API\n"):].split("\n## ", 2)[1]
    code = " ".join(re.findall(r"`([^`]*)`", section))
    for name in dbi.__all__:
        assert re.search(rf"(?<![\w.]){name}\b", code), name


USER_DOCS = [README, README.parent / "CHANGELOG.md", *sorted((README.parent / "docs").glob("*.md"))]
HISTORY = re.compile(r"\bissue \d+|\bissues? #?\d+|\b(?:first|second|third|fourth) round\b|\bcommit `?[0-9a-f]{7,40}"
                     r"|\bload average|\bload \d", flags=re.I)


@pytest.mark.parametrize("path", USER_DOCS, ids=[p.name for p in USER_DOCS])
def test_user_docs_describe_the_software_not_its_history(path):
    found = HISTORY.findall(path.read_text(encoding="utf-8"))
    assert not found, f"{path.name}: {found[:5]}"
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


@pytest.mark.parametrize("doc, line, code", DOC_BLOCKS, ids=[f"{doc}:{line}" for doc, line, _ in DOC_BLOCKS])
def test_readme_python_block_runs_as_written(_isolated, doc, line, code):
    for module in re.findall(r"^(?:import|from) (lightning|transformers|matplotlib|onnx)\b", code, flags=re.M):
        pytest.importorskip(module)  # the optional extras; the dev extra has them all
    if "plot_masks" in code:
        pytest.importorskip("skimage")
    exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102


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


def _collected(*args: str) -> str:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
                             "tests/test_coverage.py", *args], capture_output=True, text=True, cwd=README.parent,
                            timeout=300)
    return result.stdout


def test_the_readme_test_command_leaves_the_long_set_out_and_pytest_m_slow_runs_it():
    default, slow = _collected(), _collected("-m", "slow")
    assert "test_coverage.py::test_torchvision_sample[resnet18]" in default
    assert "test_zoo_sweep_pass_rates" not in default and "deselected" in default
    assert "test_zoo_sweep_pass_rates" in slow and "test_torchvision_sample[resnet18]" not in slow


def test_the_experiment_says_what_is_reproducible_across_machines():
    text = (README.parent / "docs" / "experiment.md").read_text(encoding="utf-8")
    section = text[text.index("**What is reproducible.**"):].split("\n\n", 1)[0]
    assert "same CPU" in section and "Across machines it does not" in section
