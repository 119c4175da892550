"""``docs/op.md``, the op's user documentation: it describes the software as it is (no history), and names what
users can set: every kernel, the variables that force a kernel or skip the inductor pass, the public functions."""

from __future__ import annotations

import re
from pathlib import Path

import dropblock_inject.ops as ops
from dropblock_inject.ops import _dispatch, _functional

DOC = Path(__file__).resolve().parent.parent / "docs" / "op.md"
HISTORY = re.compile(r"\bissue \d+|\bissues? #?\d+|\b(?:first|second|third|fourth) round\b|\bcommit `?[0-9a-f]{7,40}"
                     r"|\bload average|\bload \d", flags=re.I)


def test_op_doc_describes_the_software_not_its_history():
    assert not HISTORY.findall(DOC.read_text(encoding="utf-8"))


def test_op_doc_names_every_kernel_and_setting():
    text = DOC.read_text(encoding="utf-8")
    kernels = re.findall(r"^\| `(\w+)` \|", text[text.index("\n## Kernels\n"):], flags=re.M)
    assert sorted(kernels) == sorted(_dispatch.KERNELS)
    for setting in (_dispatch.ENV_VAR, _functional.INDUCTOR_PASS_VAR, "set_kernel", "kernel_for"):
        assert setting in text, setting
    assert {"set_kernel", "kernel_for"} <= set(ops.__all__)
