"""Argument checks of the public entry points, and the bounded quoting their messages use.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, out of range) naming
the function and the argument, what it expects, and the value it got, quoted by :func:`quote` so that a
message stays short (a couple of hundred characters) whatever the value: a 10 MB string, a list of a
million items, a structure that shares itself through YAML aliases, a 5,000-digit integer.
"""

from __future__ import annotations

import math
import operator
import reprlib
import sys
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["QUOTE_LIMIT", "check_bool", "check_example_input", "check_model", "check_probability",
           "check_step", "check_surgery_args", "check_total_steps", "cut", "quote"]

QUOTE_LIMIT = 200
"""Most characters of a value quoted in a message (an ellipsis marks the cut)."""

MAX_STEPS = sys.maxsize
"""Largest step count accepted (int64, what trainers count with): far beyond any training run, and a
float holds it, so the schedule's arithmetic never overflows."""


class _Repr(reprlib.Repr):
    """``reprlib`` with a cap on integers that costs nothing: the decimal form of a huge int takes quadratic
    time (and Python refuses it past 4,300 digits), its bit length is free."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = 160
        self.maxother = 80
        self.maxlong = 40
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            digits = int(x.bit_length() * math.log10(2)) + 1
            return f"{'-' if x < 0 else ''}<an integer of about {digits} digits>"
        return repr(x)


_REPR = _Repr()


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to at most ``limit`` characters, in time bounded whatever ``value`` is.

    Args:
        value: anything; containers are shown to a few items and levels, strings to their first characters.
        limit: the most characters returned.

    Returns:
        The representation, ending with ``...`` when it was cut.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the error being reported
        text = f"<{type(value).__name__} object>"
    return cut(text, limit)


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` itself up to ``limit`` characters, else its beginning and an ellipsis.

    Args:
        text: a message part (an error message of another library).
        limit: the most characters returned.

    Returns:
        The text, cut.
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _got(value: Any) -> str:
    return f"{quote(value)} ({type(value).__name__})"


def check_model(model: Any, fn_name: str, arg: str = "model") -> nn.Module:
    """``model`` if it is an ``nn.Module`` instance, else a TypeError saying what was passed instead.

    Args:
        model: the value passed as the model.
        fn_name: the public function called, for the message (``"inject"``).
        arg: the argument's name.

    Returns:
        ``model``.
    """
    if isinstance(model, nn.Module):
        return model
    hint = ""
    if isinstance(model, type) and issubclass(model, nn.Module):
        hint = f"; it is the class {model.__name__}, pass an instance: {model.__name__}(...)"
    elif isinstance(model, (str, Mapping)) and fn_name in ("inject", "plan"):
        hint = f"; the model comes first: {fn_name}(model, recipe)"
    elif callable(model) and not isinstance(model, nn.Module):
        hint = "; it is a function, pass the module it builds (call it)"
    raise TypeError(f"{fn_name}(): {arg} must be a torch.nn.Module (the network, or a wrapper such as "
                    f"DataParallel), but got {_got(model)}{hint}")


_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))


def _holds_tensor(value: Any, budget: int = 10_000) -> bool | None:
    """True when a Tensor is found in ``value`` (through tuples, lists and mappings, up to ``budget``
    items), False when only plain scalars are found, None for anything else (the model decides)."""
    stack = [value]
    seen = 0
    while stack and seen < budget:
        v = stack.pop()
        seen += 1
        if isinstance(v, Tensor):
            return True
        if isinstance(v, (tuple, list)):
            stack.extend(v[:budget])
        elif isinstance(v, Mapping):
            stack.extend(list(v.values())[:budget])
        elif not isinstance(v, _SCALARS):
            return None
    return False if not stack else None


def check_example_input(example_input: Any, fn_name: str) -> Any:
    """``example_input`` if the model could take it: ``None``, a Tensor, or arguments holding a Tensor.

    Args:
        example_input: the value passed.
        fn_name: the public function called.

    Returns:
        ``example_input``.
    """
    if example_input is None or _holds_tensor(example_input) is not False:
        return example_input
    raise TypeError(f"{fn_name}(): example_input must be None, a Tensor (e.g. torch.randn(1, 3, 224, 224)), "
                    f"a tuple of the model's arguments or a list of image tensors, but got {_got(example_input)}"
                    f", which holds no tensor")


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else a TypeError (``"no"`` or ``0`` passed for a flag is a mistake).

    Args:
        value: the value passed.
        name: how the message names it (``"DropBlockScheduleCallback(strip_on_fit_end)"``).

    Returns:
        ``value``.
    """
    if isinstance(value, bool):
        return value
    raise TypeError(f"{name} must be True or False, but got {_got(value)}")


def _as_int(value: Any, name: str, float_hint: str = "") -> int:
    """``value`` as an int (int, numpy integer, 0-d integer tensor); a bool or a float is a ``TypeError``, a
    finite float's message ending with ``float_hint``."""
    if isinstance(value, (bool, float)):
        hint = float_hint if isinstance(value, float) and math.isfinite(value) else ""
        raise TypeError(f"{name} must be an int, but got {_got(value)}{hint}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, but got {_got(value)}") from None


def check_total_steps(total_steps: Any, name: str = "total_steps") -> int:
    """A positive int up to :data:`MAX_STEPS` (int, numpy integer, 0-d integer tensor).

    Args:
        total_steps: the value passed.
        name: how the message names it.

    Returns:
        The value as an int.
    """
    value = _as_int(total_steps, name, "; pass int(total_steps)")
    if not 0 < value <= MAX_STEPS:
        raise ValueError(f"{name} must be a positive int of at most 2**63 - 1, but got {quote(value)}")
    return value


def check_step(step: Any, name: str = "global_step") -> int:
    """A step >= 0 (an int as for :func:`check_total_steps`; steps past the end of a ramp are fine).

    Args:
        step: the value passed.
        name: how the message names it.

    Returns:
        The value as an int.
    """
    value = _as_int(step, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, but got {quote(value)}")
    return value


def check_probability(value: Any, name: str, *, optional: bool = False) -> float | None:
    """A keep_prob in [0, 1] as a float (``None`` too when ``optional``); huge or non-finite numbers are out
    of range, never an OverflowError.

    Args:
        value: the value passed.
        name: how the message names it.
        optional: whether ``None`` is accepted (and returned).

    Returns:
        The value as a float, or None.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a float in [0, 1]" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {what}, but got {_got(value)}")
    if not 0.0 <= value <= 1.0:  # exact for ints of any size; rejects NaN
        raise ValueError(f"{name} must be a keep_prob in [0, 1], but got {quote(value)}")
    return float(value)


def check_surgery_args(fn_name: str, model: Any, example_input: Any = None) -> None:
    """The checks ``inject``, ``plan`` and ``strip`` run first: the model, then the example input (the recipe
    is checked by ``load_recipe``).

    Args:
        fn_name: the public function called.
        model: its ``model`` argument.
        example_input: its ``example_input`` argument (``None`` for ``strip``).
    """
    check_model(model, fn_name)
    check_example_input(example_input, fn_name)
