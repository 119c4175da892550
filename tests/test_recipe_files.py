"""Recipe files: size, encoding, what a path is, and YAML with bounds (duplicate keys, aliases, nesting)."""

import os
import time

import pytest
import yaml

from dropblock_inject.recipe import MAX_BYTES, RecipeError, load_recipe
from dropblock_inject.recipe import files

RULES = "rules: [{modules: [layer4.*], shortcut: true}]\n"


def _laughs(last: str) -> str:
    """A "billion laughs" document: nine levels of nine aliases each, 9**9 strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(8):
        lines.append(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]")
    return "\n".join(lines) + "\n" + last


def _error(path, within: float = 2.0) -> str:
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.perf_counter() - start < within
    message = str(info.value)
    assert len(message) < 600
    assert str(path) in message
    return message


@pytest.mark.parametrize("last", ["rules: *i\n", "description: *i\n" + RULES,
                                  "dropblock: {block_size: *i}\n" + RULES])
def test_billion_laughs_is_refused_at_once_with_a_short_message(tmp_path, last):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(last))
    assert path.stat().st_size < 500
    assert "expand to more than" in _error(path, within=1.0)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rules: &r [*r]\n")
    assert "its own anchor" in _error(path)


def test_aliases_and_merge_keys_within_bounds_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - &base {name: g3, modules: [layer3.*], shortcut: true, drop_rate_scale: 0.25}\n"
                    "  - {<<: *base, name: g4, modules: [layer4.*], drop_rate_scale: 1.0}\n")
    g3, g4 = load_recipe(path).rules
    assert (g3.modules, g3.drop_rate_scale, g4.modules, g4.drop_rate_scale) == (("layer3.*",), 0.25, ("layer4.*",), 1)
    assert g4.shortcut


@pytest.mark.parametrize("text, key, lines", [
    ("rules: [{modules: [layer3.*]}]\ndescription: two rules sections\nrules: [{modules: [layer4.*]}]\n",
     "rules", "lines 1 and 3"),
    ("rules:\n  - modules: [layer3.*]\n    shortcut: true\n    modules: [layer4.*]\n", "modules", "lines 2 and 4"),
    ("rules: [{modules: [a], modules: [b]}]\n", "modules", "line 1"),
    ("dropblock: {keep_prob: 0.9}\ndropblock: {keep_prob: 0.5}\n" + RULES, "dropblock", "lines 1 and 2"),
])
def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    message = _error(path)
    assert f"key '{key}' is given twice" in message and lines in message


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")
def test_libyaml_loader_is_used_when_present():
    assert files._Loader is yaml.CSafeLoader


def test_deep_nesting_is_a_recipe_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "deep.yaml"
    path.write_text("rules: " + "[" * 5000 + "]" * 5000)
    _error(path)
    path.write_text("rules: " + "[" * 300 + "]" * 300)
    assert "levels deep" in _error(path)
    # the pure-Python loader (PyYAML without libyaml) recurses: its RecursionError is reported the same way
    monkeypatch.setattr(files, "_Loader", yaml.SafeLoader)
    path.write_text("rules: " + "[" * 5000 + "]" * 5000)
    _error(path, within=10.0)


def test_encodings(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(("description: caf\xe9\n" + RULES).encode("latin-1"))
    assert "is not UTF-8 text" in _error(latin)
    bom16 = tmp_path / "utf16.yaml"
    bom16.write_text("description: café\n" + RULES, encoding="utf-16")  # with a byte-order mark, as YAML allows
    assert load_recipe(bom16).description == "café"
    bare16 = tmp_path / "utf16le.yaml"
    bare16.write_bytes(("description: x\n" + RULES).encode("utf-16-le"))
    _error(bare16)


def test_what_the_path_is_is_named(tmp_path):
    assert "is a directory" in _error(tmp_path)
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    assert "loop of symbolic links" in _error(loop)
    assert "does not exist" in _error(tmp_path / "missing.yaml")
    dangling = tmp_path / "dangling.yaml"
    os.symlink(tmp_path / "gone.yaml", dangling)
    assert "symbolic link to a missing file" in _error(dangling)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in _error(fifo)  # refused, not opened (opening a FIFO would block)


def test_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(RULES + "description: " + "x" * MAX_BYTES + "\n")
    assert f"at most {MAX_BYTES:,} bytes" in _error(path, within=0.5)
    path.write_text(RULES + "description: " + "x" * (MAX_BYTES - 200) + "\n")  # just under: loads
    assert len(load_recipe(path).description) == MAX_BYTES - 200


def test_cache_serves_no_stale_content(tmp_path):
    """A rewrite of the same size that keeps the time stamps (``cp -p``) is seen."""
    path = tmp_path / "r.yaml"
    path.write_text(RULES + "dropblock: {block_size: 5}\n")
    assert load_recipe(path).dropblock.block_size == 5
    stat = path.stat()
    path.write_text(RULES + "dropblock: {block_size: 3}\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_recipe(path).dropblock.block_size == 3
    assert load_recipe(path) is load_recipe(path)  # unchanged content: parsed once


def test_validation_errors_of_a_file_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rules: [{modules: [a], keep_prob: 2}]\n")
    message = _error(path)
    assert "'rules[0].keep_prob'" in message
