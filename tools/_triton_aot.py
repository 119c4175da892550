"""The fused kernel's launches, recorded and compiled ahead of time for a CUDA target, with no GPU.

Triton's interpreter, which the tests run the kernels under, executes them as numpy arrays: it accepts programs
the compiler rejects (types, constexprs, loop-carried values) and says nothing of what a program costs on a
GPU. Here the launchers of ``_triton`` run on ``meta`` tensors with a recorder in place of the kernels, so every
launch the op would make for an input is captured with its real arguments; each is then specialised as
Triton's launcher would (the same binder: 32-bit or 64-bit integers, 1 as a constant, 16-byte alignment) and
compiled by ``triton.compile`` for an sm_XX target with the ``ptxas`` Triton ships. Tests use it to check that
every launch compiles for the GPUs users train on; ``benchmarks/triton_sass.py`` to count each program's
machine instructions per element.

It reads two internals of Triton's launcher (``create_function_from_signature`` and
``JITFunction._pack_args``, Triton 3.3 and later); :func:`compile_launch` raises a clear error where they differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from dropblock_inject.ops import _triton
from dropblock_inject.ops._triton_kernels import kernels, triton

META = torch.device("meta")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the program's name, the jitted function, the grid and the arguments it was given."""

    name: str
    fn: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Recorder:
    def __init__(self, name: str, fn: Any, log: list[Launch]):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.log.append(Launch(self.name, self.fn, tuple(grid), args, kwargs))


LAYOUTS = ("contiguous", "channels_last", "strided")


def _input(shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "strided":  # every other channel of a wider tensor
        n, c, *spatial = shape
        return torch.empty(n, 2 * c, *spatial, dtype=dtype, device=META)[:, ::2]
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.empty(shape, dtype=dtype, device=META, memory_format=fmt)
    if layout == "contiguous":
        return torch.empty(shape, dtype=dtype, device=META)
    raise ValueError(f"layout must be one of {LAYOUTS}, but got {layout!r}")


def launches(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, block_size: int = 7,
             per_channel: bool = True, layout: str = "contiguous", compiled: bool = False) -> list[Launch]:
    """The launches the op makes for an input of ``shape``, recorded on ``meta`` tensors (nothing is allocated).

    Args:
        shape: the input's shape ``(N, C, *spatial)``.
        dtype: the input's dtype.
        block_size: the requested block size.
        per_channel: a mask per channel, or one per sample.
        layout: the input's (and the gradient's) layout, one of :data:`LAYOUTS`.
        compiled: the mask op's launches (what a compiled graph runs) instead of the fused op's forward and
            backward.

    Returns:
        The launches in order: seeds, rows, mask, scale, then (not ``compiled``) apply, and backward's seeds,
        rows, mask and apply.
    """
    log: list[Launch] = []
    real = kernels(interpret=False)
    ks = SimpleNamespace(**{name: _Recorder(name, value, log) if isinstance(value, triton.runtime.JITFunction)
                            else value for name, value in vars(real).items()})
    keep_prob = torch.tensor(0.9, device=META)
    if compiled:  # what the mask op runs
        _triton._draw(ks, tuple(shape), keep_prob, block_size, per_channel, True, META)
    else:  # what forward and backward run
        _, state, scale = _triton._forward(ks, _input(shape, dtype, layout), keep_prob, block_size, per_channel, True)
        _triton._backward(ks, _input(shape, dtype, layout), state, scale, block_size, per_channel)
    return log


def specialize(launch: Launch, arch: int = 90) -> tuple[Any, Any, dict[str, str], dict, dict]:
    """A launch as Triton's launcher specialises it for ``sm_{arch}``: 32-bit or 64-bit integers, 1 as a
    constant, 16-byte alignment.

    Returns:
        ``(target, options, signature, constexprs, attrs)``, what ``triton.compile`` takes.

    Raises:
        RuntimeError: this Triton's launcher internals are not the ones this module reads.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
        pack_args = launch.fn._pack_args
    except (ImportError, AttributeError) as error:
        raise RuntimeError(f"compiling a launch ahead of time reads Triton's launcher internals, which Triton "
                           f"{triton.__version__} does not have ({error})") from error
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = pack_args(backend, launch.kwargs, bound, specialization, options)
    return target, options, signature, constexprs, attrs


def compile_launch(launch: Launch, arch: int = 90) -> Any:
    """Compile one launch for ``sm_{arch}`` as Triton's launcher would specialise it, without a GPU.

    Args:
        launch: a launch from :func:`launches`.
        arch: the compute capability times ten (80: A100, 90: H100/H200).

    Returns:
        Triton's ``CompiledKernel`` (``.asm`` holds ``ttgir``, ``ptx`` and ``cubin``; ``.metadata.num_warps``).
    """
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs = specialize(launch, arch)
    return triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)
