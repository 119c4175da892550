"""Reading a recipe file: its size, its encoding, and YAML with bounds.

A recipe file is at most :data:`MAX_BYTES` long, checked before it is read. Its text is UTF-8 (or UTF-16 /
UTF-32 with a byte-order mark, as YAML allows). It is loaded with libyaml's safe loader when PyYAML has it
(the pure-Python safe loader otherwise), extended to refuse what ``yaml.safe_load`` lets through:

* a key given twice in one mapping (``yaml.safe_load`` keeps the last one silently): refused, naming the
  key and both lines;
* aliases whose expansion exceeds :data:`MAX_NODES` nodes (a "billion laughs" document, a few hundred
  bytes that expand to billions of values), or an alias inside its own anchor;
* nesting deeper than :data:`MAX_DEPTH` levels.

Every problem is a :class:`~.model.RecipeError` naming the file.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .._args import cut, quote
from .model import RecipeError

MAX_BYTES = 1 << 20
"""Largest recipe file, in bytes (1 MiB; a recipe of 10,000 rules in flow style fits)."""

MAX_NODES = 1_000_000
"""Most YAML values (scalars, lists, mappings) a document may hold once its aliases are expanded."""

MAX_DEPTH = 100
"""Deepest nesting of lists and mappings (a recipe needs four levels)."""

_MERGE = "tag:yaml.org,2002:merge"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: ~3x faster


def _duplicate(node: MappingNode) -> str | None:
    """A key given twice in ``node``, or None. Keys are compared as written, with their resolved tags, before
    ``<<`` merges are applied (an explicit key may override a merged one)."""
    lines: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
            continue
        line = key_node.start_mark.line + 1
        first = lines.get((key_node.tag, key_node.value))
        lines.setdefault((key_node.tag, key_node.value), line)
        if first is not None:
            where = f"line {line}" if first == line else f"lines {first} and {line}"
            return (f"key {quote(key_node.value)} is given twice in one mapping ({where}); "
                    f"YAML would silently keep only the last one")
    return None


def _check_nodes(root: Node) -> str | None:
    """What is wrong with the node graph, or None: a duplicate key, its expanded size and depth, computed once
    per node (an alias is the same node object as its anchor), without recursion."""
    size: dict[int, int] = {}  # collections only: a scalar is one value, one level
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = node.value if isinstance(node, SequenceNode) else [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            if isinstance(node, MappingNode) and (duplicate := _duplicate(node)):
                return duplicate
            size[key] = 1 + sum(size.get(id(c), 1) for c in children)
            height[key] = 1 + max((height.get(id(c), 1) for c in children), default=0)
            if size[key] > MAX_NODES:
                return (f"its aliases expand to more than {MAX_NODES:,} values (a document that multiplies "
                        f"itself through anchors and aliases)")
            if height[key] > MAX_DEPTH:
                return f"it nests lists and mappings more than {MAX_DEPTH} levels deep"
            continue
        if key in size:
            continue
        if key in on_path:
            return f"an alias refers to its own anchor (line {node.start_mark.line + 1}): the value would be infinite"
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if not isinstance(c, ScalarNode) and id(c) not in size)
    return None


def _decode(data: bytes, where: str) -> str:
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            break
    else:
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        hint = " (it holds NUL bytes: UTF-16 without a byte-order mark?)" if b"\x00" in data else ""
        raise RecipeError(f"{where} is not {encoding.replace('-sig', '').upper()} text: byte "
                          f"{data[e.start:e.start + 1]!r} at offset {e.start} cannot be decoded{hint}") from None


def parse_yaml(text: str, where: str) -> Any:
    """The value of the YAML document ``text``, with the bounds of this module.

    Args:
        text: the document.
        where: how messages name it (``"recipe file 'x.yaml'"``).

    Returns:
        Plain Python values (dict, list, str, int, float, bool, None, and YAML's dates, sets and bytes).

    Raises:
        RecipeError: invalid YAML, a duplicate key, too many values through aliases, too deep.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = None if isinstance(node, ScalarNode) else _check_nodes(node)
        if problem:
            raise RecipeError(f"{where} is refused: {problem}")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {cut(str(e).replace('<unicode string>', 'the file'), 600)}"
                          ) from None
    except RecursionError:  # the pure-Python composer on deep nesting
        raise RecipeError(f"{where} is refused: it nests lists and mappings too deeply") from None
    finally:
        loader.dispose()


def read_text(path: Path) -> tuple[str, bytes]:
    """The text of the recipe file ``path`` and its bytes, refusing what is not a readable file of at most
    :data:`MAX_BYTES` bytes.

    Raises:
        RecipeError: naming the file and why: missing, a directory, a symbolic-link loop, not a regular
            file, too large, unreadable, not decodable.
    """
    where = f"recipe file {quote(str(path))}"
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        code = getattr(e, "errno", None)
        if code == errno.ELOOP:
            raise RecipeError(f"{where} is a loop of symbolic links") from None
        if code in (errno.ENOENT, errno.ENOTDIR):
            dangling = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
            raise RecipeError(f"{where} does not exist{dangling}") from None
        raise RecipeError(f"cannot read {where}: {cut(str(e))}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RecipeError(f"{where} is a directory, not a recipe file")
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"{where} is not a regular file")
    if st.st_size > MAX_BYTES:
        raise RecipeError(f"{where} is {st.st_size:,} bytes; a recipe may be at most {MAX_BYTES:,} bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read {where}: {cut(str(e))}") from None
    if len(data) > MAX_BYTES:  # grew since the stat
        raise RecipeError(f"{where} is more than {MAX_BYTES:,} bytes; a recipe may be at most {MAX_BYTES:,} bytes")
    return _decode(data, where), data
