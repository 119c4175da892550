"""The command line's ``--model`` and ``--input``: build a model offline, and say in one line why it failed."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import os
import sys
from typing import Any, Iterator, Sequence

__all__ = ["ModelError", "build_model", "parse_input", "torchvision_kwargs", "default_input", "close"]

VIDEO_INPUT = "1x3x16x112x112"


class ModelError(ValueError):
    """A ``--model`` that cannot be built; the message is one line saying why and what to do."""


def close(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'a', 'b'?"`` for the close matches of ``word`` among ``choices``, or ``""``."""
    matches = difflib.get_close_matches(word, choices, n=3)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def torchvision_kwargs(builder: Any) -> dict[str, Any]:
    """The keyword arguments that keep a torchvision builder offline: ``None`` for every ``weights*``
    parameter it takes (``weights``, ``weights_backbone``), so that no pretrained file is downloaded.

    Args:
        builder: a torchvision model builder (``torchvision.models.get_model_builder(name)``).

    Returns:
        The keyword arguments, e.g. ``{"weights": None, "weights_backbone": None}``.
    """
    return {p: None for p in inspect.signature(builder).parameters if p.startswith("weights")}


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """Make the current directory importable, as ``python -m`` does (a console script's sys.path[0] is the
    script's own directory), for the duration of the import only."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_user_module(source: str, name: str) -> Any:
    try:
        with _current_directory_importable():
            return importlib.import_module(source)
    except SyntaxError as e:
        where = f" ({e.filename}, line {e.lineno})" if e.filename else ""
        raise ModelError(f"importing {source!r} failed: SyntaxError: {e.msg}{where}") from None
    except ModuleNotFoundError as e:
        if e.name and (source == e.name or source.startswith(e.name + ".")):
            guess = difflib.get_close_matches(source, ["torchvision", "timm"], n=1)
            hint = (f"; did you mean '{guess[0]}:{name}'?" if guess else
                    "; run from the directory that holds it, or add that directory to PYTHONPATH")
            raise ModelError(f"no module named {e.name!r} (--model {source}:{name} is read as module.path:factory)"
                             f"{hint}") from None
        raise ModelError(f"importing {source!r} failed: {_first_line(e)} (a module it imports is missing: "
                         f"install it, or add its directory to PYTHONPATH)") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing: one line, not a traceback
        raise ModelError(f"importing {source!r} failed: {_first_line(e)}") from None


def _call_factory(source: str, name: str, factory: Any) -> Any:
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise ModelError(f"{source}:{name} cannot be called without arguments ({e}); --model takes a function "
                         f"that needs none: write one, e.g. def build(): return {name}(...)") from None
    except ValueError:  # no signature (a builtin): just call it
        pass
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's code raised: one line, not a traceback
        raise ModelError(f"{source}:{name}() raised {_first_line(e)}") from None


def build_model(spec: str) -> Any:
    """Build a model with random weights, offline, from ``torchvision:NAME``, ``timm:NAME`` or
    ``module.path:factory`` (imported from the current directory or ``PYTHONPATH``).

    Args:
        spec: the model specification.

    Returns:
        The ``torch.nn.Module``, in eval mode.

    Raises:
        ModelError: the spec is malformed, names no model (with close matches), does not import, or its
            factory needs arguments, raises or returns something that is not a module.
    """
    source, _, name = spec.partition(":")
    if not source or not name:
        raise ModelError(f"--model {spec!r} must look like torchvision:resnet50, timm:NAME or module.path:factory")
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if name.lower() not in known:  # get_model lower-cases the name too
            raise ModelError(f"unknown torchvision model {name!r}{close(name.lower(), known)} "
                             f"(torchvision.models.list_models() has them all)")
        builder = torchvision.models.get_model_builder(name.lower())
        return torchvision.models.get_model(name.lower(), **torchvision_kwargs(builder)).eval()
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ModelError(f"unknown timm model {name!r}{close(name, timm.list_models())} "
                             f"(timm.list_models() has them all)")
        try:
            return timm.create_model(name, pretrained=False).eval()
        except RuntimeError as e:  # e.g. "Invalid pretrained tag (x) for resnet18."
            tags = timm.list_models(name.partition(".")[0], pretrained=True)
            raise ModelError(f"timm cannot build {name!r}: {str(e).rstrip('.')}{close(name, tags)}") from None
    from torch import nn

    module = _import_user_module(source, name)
    factory = getattr(module, name, None)
    if not callable(factory):
        public = [a for a in dir(module) if not a.startswith("_")]
        raise ModelError(f"module {source!r} has no callable {name!r}{close(name, public)}")
    model = _call_factory(source, name, factory)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{source}:{name}() returned an object of type {type(model).__name__}, "
                         f"not a torch.nn.Module")
    return model.eval()


def parse_input(text: str) -> tuple[int, ...]:
    """An input shape such as ``1x3x224x224`` (N, C, H, W) or ``1x3x16x112x112`` (N, C, T, H, W).

    Args:
        text: the shape, sizes separated by ``x``.

    Returns:
        The shape as a tuple of positive ints.

    Raises:
        argparse.ArgumentTypeError: not 4 or 5 positive integers.
    """
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"must be 4 or 5 positive sizes like 1x3x224x224 (N x C x H x W) or {VIDEO_INPUT}, got {text!r}")
    return shape


def is_video(model: Any) -> bool:
    """Whether ``model`` holds 3-D convolutions (it takes (N, C, T, H, W) clips)."""
    from torch import nn

    return any(isinstance(m, nn.Conv3d) for m in model.modules())


def default_input(model: Any, batch: int = 1) -> tuple[int, ...]:
    """The example input shape when ``--input`` is not given: ``batch x 3 x 224 x 224``, or
    ``batch x 3 x 16 x 112 x 112`` for a model with 3-D convolutions.

    Args:
        model: the built model.
        batch: the batch size.

    Returns:
        The shape.
    """
    return (batch, 3, 16, 112, 112) if is_video(model) else (batch, 3, 224, 224)


def input_hint(model: Any, shape: Sequence[int]) -> str:
    """A hint for an error raised with input ``shape``: a 4-D input on a video model, or the reverse."""
    if is_video(model) and len(shape) == 4:
        return f" (this model has 3-D convolutions: give it (N, C, T, H, W) clips, e.g. --input {VIDEO_INPUT})"
    if not is_video(model) and len(shape) == 5:
        return " (this model has no 3-D convolution: give it (N, C, H, W) images, e.g. --input 1x3x224x224)"
    return ""
