"""Compiled graphs call ``drop_block_mask`` and multiply in plain arithmetic, which inductor fuses.

The fused op is opaque to inductor: a compiled graph would write the activation out before it and read it
back after, in forward and backward. These tests pin what replaces it under ``torch.compile``: the mask op
(the same masks as eager under the same seed), a product inductor fuses into its neighbours' kernels, and
``torch.export`` / fx still seeing the one fused op.
"""

from __future__ import annotations

import re
import uuid

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from dropblock_inject import DropBlock2d, DropBlock3d

MASK_OP = torch.ops.dropblock_inject.drop_block_mask.default
FUSED_OP = torch.ops.dropblock_inject.drop_block.default


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("per_channel, block_size, channels_last", [
    (True, 3, False), (True, 3, True),  # the sparse mask, in the input's layout
    (False, 3, False), (True, 20, False),  # broadcast multipliers: a shared mask, a block covering the map
])
def test_opcheck_schema_and_fake_kernel(per_channel, block_size, channels_last):
    x = torch.randn(4, 8, 12, 12)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (list(x.shape), list(x.stride()), x.dtype, x.device, torch.tensor(0.9), block_size, per_channel, True)
    result = torch.library.opcheck(MASK_OP, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize("backend, make, shape, channels_last", [
    ("inductor", lambda: DropBlock2d(3, 0.8), (4, 16, 12, 12), False),
    ("inductor", lambda: DropBlock2d(3, 0.8), (4, 16, 12, 12), True),
    ("inductor", lambda: DropBlock2d(3, 0.8, per_channel=False), (4, 16, 12, 12), False),
    ("aot_eager", lambda: DropBlock3d(3, 0.85), (2, 8, 6, 10, 10), False),
    ("aot_eager", lambda: DropBlock2d(20, 0.8), (4, 16, 12, 12), False),
])
def test_compiled_module_drops_the_eager_blocks_with_the_eager_gradient(dynamo_reset, backend, make, shape,
                                                                        channels_last):
    module = make().train()
    x = torch.rand(shape) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    results = []
    for call in (module, torch.compile(module, backend=backend, fullgraph=True)):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = call(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (eager, eager_grad), (out, out_grad) = results
    assert (eager == 0).any() and torch.equal(out, eager) and torch.equal(out_grad, eager_grad)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_compiled_graph_holds_the_mask_op_and_no_fused_op(dynamo_reset):
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    m = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock2d(3, 0.9), nn.ReLU()).train()
    torch.compile(m, backend=backend, fullgraph=True)(torch.randn(2, 3, 10, 10))
    (graph,) = graphs
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count(MASK_OP) == 1 and FUSED_OP not in targets
    # export keeps the one fused op (a stable node for exported programs)
    program = torch.export.export(m, (torch.randn(2, 3, 10, 10),))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(FUSED_OP) == 1 and MASK_OP not in targets


def _kernels(code: list[str]) -> set[str]:
    return {name for source in code for name in re.findall(r"\b(cpp_fused_\w+)\(", source)}


def test_inductor_fuses_the_product_into_the_batchnorm_kernels(dynamo_reset):
    """conv -> BN -> DropBlock -> ReLU compiles to as many generated kernels, forward and backward, as
    conv -> BN -> ReLU: the mask product adds no pass over the activation of its own."""
    def step_code(dropblock: bool) -> list[str]:
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1)]
        if dropblock:
            layers.insert(2, DropBlock2d(3, 0.8))
        compiled = torch.compile(nn.Sequential(*layers).train(), fullgraph=True)
        x = torch.randn(4, 3, 14, 14, requires_grad=True)
        _, code = run_and_get_code(lambda: compiled(x).sum().backward())
        return code

    plain, injected = step_code(False), step_code(True)
    assert any("drop_block_mask" in c for c in injected)
    assert not any("dropblock_inject.drop_block.default" in c for c in injected)
    assert len(_kernels(injected)) == len(_kernels(plain)) > 0


def test_hoisted_mask_ops_keep_their_order_beside_a_users_pass(dynamo_reset):
    """Two DropBlocks in one graph: the pass moves both mask ops up in their order (each draws the seed the
    eager model's DropBlock draws), and runs beside a post-grad pass the user set."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from dropblock_inject.ops._hoist import ChainedPasses, HoistMaskOps

    run_id = str(uuid.uuid4())

    class Counted(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            Counted.calls += 1

        def uuid(self):  # new in every run: a hit in inductor's on-disk cache would run no pass at all
            return run_id

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), DropBlock2d(3, 0.8), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), DropBlock2d(3, 0.7)).train()
    x = torch.randn(4, 3, 16, 16)
    with config.patch(post_grad_custom_pre_pass=Counted()):
        compiled = torch.compile(model, fullgraph=True)
        outs = []
        for call in (model, compiled):
            torch.manual_seed(3)
            outs.append(call(x.clone().requires_grad_()))
        passes = config.post_grad_custom_pre_pass
    assert isinstance(passes, ChainedPasses)  # one callable: inductor in torch 2.11 takes no list
    assert isinstance(passes.passes[0], Counted) and isinstance(passes.passes[1], HoistMaskOps)
    assert passes.uuid() == f"{run_id}|{HoistMaskOps().uuid()}"  # the FX graph cache still keys on both
    assert Counted.calls > 0
    eager, out = (o.detach() for o in outs)
    assert torch.equal(eager == 0, out == 0)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)  # BatchNorm compiled: not bitwise


def test_hoist_moves_mask_ops_up_in_order():
    from dropblock_inject.ops._hoist import hoist_mask_ops

    graph = torch.fx.Graph()
    x, keep_prob = graph.placeholder("x"), graph.placeholder("keep_prob")
    y = graph.call_function(torch.relu, (x,))
    first = graph.call_function(MASK_OP, ([2, 4, 8, 8], [256, 64, 8, 1], torch.float32, torch.device("cpu"),
                                          keep_prob, 3, True, True))
    z = graph.call_function(torch.relu, (y,))
    second = graph.call_function(MASK_OP, ([2, 4, 8, 8], [256, 64, 8, 1], torch.float32, torch.device("cpu"),
                                           keep_prob, 3, True, True))
    graph.output((first, second, z))
    assert hoist_mask_ops(graph) == 2
    assert list(graph.nodes)[:5] == [x, keep_prob, first, second, y]
    assert hoist_mask_ops(graph) == 0  # already in place


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_checkpointed_region_backward_uses_the_forward_mask(dynamo_reset, backend):
    """Activation checkpointing inside a compiled graph must not draw a second mask for backward."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.db = DropBlock2d(3, 0.8)

        def forward(self, x):
            return checkpoint(lambda t: self.db(t * 2) * 3, x, use_reentrant=False)

    compiled = torch.compile(Checkpointed().train(), backend=backend, fullgraph=True)
    x = (torch.rand(8, 16, 12, 12) + 0.5).requires_grad_()
    y = compiled(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert (y == 0).any()
    torch.testing.assert_close(x.grad, g * y.detach() / x.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [True, False])
def test_mask_layout_follows_inductors_layout_of_the_graph(dynamo_reset, conv):
    """Inductor runs CPU graphs with a convolution channels-last: their masks are laid out channels-last
    (a contiguous one would be read by gathers); a graph without one keeps the input's contiguous layout."""
    layers = [nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), DropBlock2d(3, 0.8)] if conv else [DropBlock2d(3, 0.8)]
    compiled = torch.compile(nn.Sequential(*layers).train(), fullgraph=True)
    x = torch.randn(4, 3 if conv else 16, 14 if conv else 12, 14 if conv else 12, requires_grad=True)
    _, code = run_and_get_code(lambda: compiled(x).sum().backward())
    (strides,) = {m for c in code for m in re.findall(r"drop_block_mask\.default\(\[[\d, ]+\], (\[[\d, ]+\])", c)}
    assert strides == ("[2304, 1, 192, 16]" if conv else "[2304, 144, 12, 1]")


def test_dynamic_shapes_compile_once_and_drop_the_expected_fraction(dynamo_reset):
    from _dropblock_stats import TOL, assert_whole_blocks, expected_drop_fraction
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(DropBlock2d(3, 0.8).train(), backend=counter, dynamic=True, fullgraph=True)
    for n, size in ((256, 12), (192, 15)):
        y = compiled(torch.ones(n, 8, size, size))
        assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(0.8, 3, (size, size)),
                                                                abs=TOL)
        assert_whole_blocks(y, 3)
    assert counter.frame_count == 1


def test_compiled_graph_on_triton_multiplies_by_the_fused_kernels_mask(dynamo_reset, monkeypatch):
    """What a CUDA compile runs, here on CPU: both ops take their Triton branch (interpreted), and the compiled
    model (mask op, product fused by inductor, channels-last convolution) drops exactly the eager fused op's
    blocks, with its outputs and gradients up to the compiled convolution's and BatchNorm's rounding."""
    pytest.importorskip("triton")
    monkeypatch.setenv("DROPBLOCK_INJECT_KERNEL", "triton")  # on CPU tensors: interpreted

    class Fused(nn.Module):  # the eager op, as a GPU model runs it
        def forward(self, x):
            return FUSED_OP(x, torch.tensor(0.8), 3, True, True)[0]

    conv, bn = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)
    eager = nn.Sequential(conv, bn, Fused(), nn.ReLU()).train()
    compiled = torch.compile(nn.Sequential(conv, bn, DropBlock2d(3, 0.8), nn.ReLU()).train(), fullgraph=True)
    x = torch.randn(4, 3, 14, 14)
    grad = torch.randn(4, 16, 12, 12, generator=torch.Generator().manual_seed(1))
    results = []
    for call in (eager, compiled):
        leaf = x.clone().requires_grad_()
        conv.weight.grad = None
        torch.manual_seed(7)
        out = call(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad, conv.weight.grad))
    (eager_out, *eager_grads), (out, *grads) = results
    blocks = (eager_out == 0) & (bn(conv(x)).relu() != 0)  # zeros the ReLU did not make
    assert blocks.any() and torch.equal(out == 0, eager_out == 0)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)  # a convolution and BatchNorm between
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_channel, block_size", [(True, 3), (False, 3), (True, 20)])
def test_fake_kernel_describes_the_triton_mask_on_cuda(per_channel, block_size, monkeypatch):
    """What compile plans for a CUDA input (no GPU needed): the Triton kernels' contiguous ``bool`` mask, one
    plane per channel or per sample, even for a block covering the map, and an fp32 scale."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    pytest.importorskip("triton")
    from dropblock_inject.ops import _dispatch

    monkeypatch.setattr(_dispatch._selfcheck, "passes", lambda *args: True)  # checked on a GPU; none here
    with FakeTensorMode():
        x = torch.empty(2, 8, 12, 12, device="cuda").to(memory_format=torch.channels_last)
        keep, scale = MASK_OP(list(x.shape), list(x.stride()), x.dtype, x.device, torch.tensor(0.9, device="cuda"),
                              block_size, per_channel, True)
    assert keep.device.type == "cuda" and keep.dtype == torch.bool and keep.is_contiguous()
    assert keep.shape == (2, 8 if per_channel else 1, 12, 12)
    assert (scale.shape, scale.dtype) == ((), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton path runs interpreted above)")
@pytest.mark.parametrize("per_channel, channels_last", [(True, False), (True, True), (False, False)])
def test_compiled_cuda_module_drops_the_eager_blocks_with_the_eager_gradient(dynamo_reset, per_channel,
                                                                             channels_last):
    """On a GPU: the eager op runs the fused Triton kernel, the compiled graph its mask launches and a product
    inductor generates; the same blocks, outputs and gradients, bitwise."""
    pytest.importorskip("triton")
    module = DropBlock2d(3, 0.8, per_channel=per_channel).train().cuda()
    x = torch.rand(16, 32, 14, 14, device="cuda") + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, device="cuda")
    leaf = x.clone().requires_grad_()
    torch.manual_seed(7)
    eager = module(leaf)
    eager.backward(grad)
    eager_grad = leaf.grad
    compiled = torch.compile(module, fullgraph=True)
    leaf = x.clone().requires_grad_()
    torch.manual_seed(7)

    def compiled_step() -> torch.Tensor:
        out = compiled(leaf)
        out.backward(grad)
        return out.detach()

    out, codes = run_and_get_code(compiled_step)
    assert any("drop_block_mask" in c for c in codes) and not any("dropblock_inject.drop_block." in c for c in codes)
    assert (eager == 0).any() and torch.equal(out, eager) and torch.equal(leaf.grad, eager_grad)
