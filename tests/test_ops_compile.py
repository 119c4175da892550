"""The registered op ``torch.ops.dropblock_inject.drop_block`` under torch.compile, torch.export and torch.fx.

Each of them must see DropBlock as ONE call of the op (no graph break, no Python-baked keep_prob), read
keep_prob from the module's buffer (so a keep_prob schedule never recompiles) and still draw the right
distribution with the right gradient. Compiles are slow on a CPU: few, small ones.
"""

from __future__ import annotations

import pytest
import torch
from _dropblock_stats import TOL, assert_scaled_mask, assert_whole_blocks, expected_drop_fraction
from _models import SmallResNet
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torchvision.models.feature_extraction import create_feature_extractor

import dropblock_inject as dbi
from dropblock_inject import DropBlock2d, DropBlock3d, drop_block2d

OP = torch.ops.dropblock_inject.drop_block.default

SMALL_RECIPE = {
    "dropblock": {"block_size": 5, "keep_prob": 0.8},
    "rules": [{"name": "stage4", "modules": ["layer4.*"], "after": ["norm"], "shortcut": True}],
}


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def op_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == OP]


def check_grad(fn, x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``fn`` is the mask times the scale: ``g * y / x`` for a positive ``x``."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * y.detach() / x.detach(), rtol=1e-5, atol=1e-6)
    return y


# ----------------------------------------------------------------------------------------------------------
# the registration


@pytest.mark.parametrize("per_channel, block_size, channels_last", [
    (True, 3, False), (True, 3, True),  # the sparse kernel
    (False, 3, False), (True, 20, False),  # broadcast masks: shared, and a block covering the whole map
])
def test_opcheck_schema_fake_kernel_and_autograd(per_channel, block_size, channels_last):
    x = torch.randn(4, 8, 12, 12)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    result = torch.library.opcheck(OP, (x.requires_grad_(), torch.tensor(0.9), block_size, per_channel, True))
    assert set(result.values()) == {"SUCCESS"}


def test_fake_kernel_describes_the_triton_state_on_cuda(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    pytest.importorskip("triton")
    from dropblock_inject.ops import _dispatch

    monkeypatch.setattr(_dispatch._selfcheck, "passes", lambda *args: True)  # checked on a GPU; none here
    with FakeTensorMode():  # no GPU needed: what compile would plan for a CUDA input
        x = torch.empty(2, 8, 14, 14, device="cuda")
        out, state, scale = OP(x, torch.tensor(0.9, device="cuda"), 7, True, True)
    assert out.device.type == "cuda" and out.shape == x.shape
    assert (state.shape, state.dtype) == ((2,), torch.int64)  # philox seed + threshold
    assert (scale.shape, scale.dtype) == ((), torch.float32)


# ----------------------------------------------------------------------------------------------------------
# torch.compile


def test_inductor_fullgraph_one_graph_for_a_keep_prob_schedule(dynamo_reset):
    counter = CompileCounterWithBackend("inductor")
    m = DropBlock2d(3, 1.0).train()
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kp in (1.0, 0.95, 0.85, 0.7):  # a linear ramp, as KeepProbScheduler sets it
            m.keep_prob = kp
            x = torch.ones(512, 8, 12, 12, requires_grad=True)
            y = compiled(x)
            g = torch.randn_like(y)
            y.backward(g)
            y = y.detach()
            frac = float((y == 0).double().mean())
            assert frac == pytest.approx(expected_drop_fraction(kp, 3, (12, 12)), abs=TOL)
            assert_whole_blocks(y, 3)
            assert_scaled_mask(y)
            assert torch.equal(x.grad, g * y)  # the gradient is the mask times the scale
    assert counter.frame_count == 1


def test_compiled_graph_holds_one_mask_op_reading_the_buffer(dynamo_reset):
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    m = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock2d(3, 0.9, per_channel=False), nn.ReLU()).train()
    torch.compile(m, backend=backend, fullgraph=True)(torch.randn(2, 3, 10, 10))
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and "drop_block" in str(n.target)]
    assert len(calls) == 1
    (keep_prob,) = (a for a in calls[0].args if isinstance(a, torch.fx.Node))  # the op's one tensor argument
    assert keep_prob.op in ("placeholder", "get_attr") and "keep_prob_tensor" in keep_prob.name


def test_aot_autograd_gradient_3d_and_channels_last(dynamo_reset):
    m3 = torch.compile(DropBlock3d(2, 0.8).train(), backend="aot_eager", fullgraph=True)
    check_grad(m3, torch.rand(4, 8, 4, 6, 6) + 0.5)
    m2 = torch.compile(DropBlock2d(3, 0.8).train(), backend="aot_eager", fullgraph=True)
    x = (torch.rand(4, 8, 9, 9) + 0.5).to(memory_format=torch.channels_last)
    y = check_grad(m2, x)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_compiled_functional_with_a_tensor_keep_prob(dynamo_reset):
    counter = CompileCounter()
    fn = torch.compile(lambda x, kp: drop_block2d(x, kp, 3), backend=counter, fullgraph=True)
    x = torch.ones(512, 8, 12, 12)
    for kp in (0.9, 0.6):
        frac = float((fn(x, torch.tensor(kp)) == 0).double().mean())
        assert frac == pytest.approx(expected_drop_fraction(kp, 3, (12, 12)), abs=TOL)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------------------
# torch.export


def test_export_train_mode_one_op_node_and_eval_none():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock2d(3, 0.9))
    x = torch.randn(4, 3, 12, 12)
    program = torch.export.export(m.train(), (x,))
    (node,) = op_nodes(program.graph)
    assert node.args[1].op == "placeholder"  # keep_prob is the buffer, not a constant baked in
    assert not any(w in str(n.target) for n in program.graph.nodes for w in ("poisson", "rand", "index_fill"))
    y = program.module()(torch.ones(4, 3, 12, 12))
    assert y.shape == (4, 8, 10, 10)
    program = torch.export.export(m.eval(), (x,))
    assert not op_nodes(program.graph)
    torch.testing.assert_close(program.module()(x), m(x))


def test_export_injected_model_train_mode():
    model = dbi.inject(SmallResNet(), SMALL_RECIPE).train()
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),))
    assert len(op_nodes(program.graph)) == len(dbi.injected_dropblocks(model)) > 0


# ----------------------------------------------------------------------------------------------------------
# torch.fx


def test_symbolic_trace_sees_one_node_reading_the_buffer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), DropBlock2d(3, 0.9)).train()
    gm = torch.fx.symbolic_trace(model)
    (node,) = op_nodes(gm.graph)
    assert node.args[1].op == "get_attr" and node.args[1].target == "1.keep_prob_tensor"
    assert node.args[2:] == (3, True, True)
    assert set(gm.state_dict()) == set(model.state_dict())  # the traced tensor is no persistent buffer there
    # the graph reads the module's buffer: a new keep_prob reaches the traced graph
    model[1].keep_prob = 0.7
    with torch.no_grad():
        gm.get_submodule("0").weight.zero_()
        gm.get_submodule("0").bias.fill_(1.0)
    y = gm(torch.ones(512, 3, 14, 14))
    frac = float((y == 0).double().mean())
    assert frac == pytest.approx(expected_drop_fraction(0.7, 3, (12, 12)), abs=TOL)
    assert_whole_blocks(y, 3)
    assert not op_nodes(torch.fx.symbolic_trace(model.eval()).graph)  # eval: the identity


def test_symbolic_trace_of_the_functional_form():
    gm = torch.fx.symbolic_trace(lambda x: drop_block2d(x, 0.8, 3))
    assert len(op_nodes(gm.graph)) == 1
    y = gm(torch.ones(512, 8, 12, 12))
    assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(0.8, 3, (12, 12)), abs=TOL)


def test_create_feature_extractor_of_an_injected_model_train_and_eval():
    model = dbi.inject(SmallResNet(), SMALL_RECIPE)
    x = torch.randn(2, 3, 64, 64)
    extractor = create_feature_extractor(model, return_nodes={"layer4": "c5"})
    model.eval()
    extractor.eval()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["c5"], model.layer4(model.layer3(model.stem(x))))
    extractor.train()
    y = extractor(x)["c5"]
    y.sum().backward()
    train_graph = extractor.train_graph if hasattr(extractor, "train_graph") else extractor.graph
    assert len(op_nodes(train_graph)) == len(dbi.injected_dropblocks(model))


# ----------------------------------------------------------------------------------------------------------
# random numbers under torch.compile


@pytest.mark.parametrize("per_channel", [True, False])  # the sparse kernel, and a broadcast mask
def test_compiled_keep_prob_one_draws_no_random_numbers(dynamo_reset, per_channel):
    m = DropBlock2d(3, 1.0, per_channel=per_channel).train()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    state = torch.get_rng_state()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    assert torch.equal(torch.get_rng_state(), state)
    m.keep_prob = 0.9  # the same graph then draws
    assert not torch.equal(compiled(x), x) and not torch.equal(torch.get_rng_state(), state)


def test_two_calls_with_the_same_arguments_draw_two_masks(dynamo_reset):
    # identical calls of the op must not be merged by AOT autograd's CSE (the op is nondeterministic_seeded)
    fn = torch.compile(lambda x, kp: (drop_block2d(x, kp, 3), drop_block2d(x, kp, 3)), backend="aot_eager",
                       fullgraph=True)
    a, b = fn(torch.ones(64, 8, 12, 12, requires_grad=True), torch.tensor(0.8))
    assert not torch.equal(a == 0, b == 0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_one_module_applied_twice_draws_two_masks(dynamo_reset, backend):
    """Two calls of one DropBlock on inputs of one shape: the same arguments, two masks. torch 2.14's CSE keeps
    ``nondeterministic_seeded`` ops apart; 2.11's only its list of random ops, where the ops list themselves."""
    from torch._functorch.compile_utils import rand_ops

    m = DropBlock2d(3, 0.8).train()
    fn = torch.compile(lambda a, b: (m(a), m(b)), backend=backend, fullgraph=True)
    a, b = fn(torch.ones(64, 8, 12, 12, requires_grad=True), torch.ones(64, 8, 12, 12, requires_grad=True))
    assert (a == 0).any() and not torch.equal(a == 0, b == 0)
    assert torch.ops.dropblock_inject.drop_block_mask in rand_ops and torch.ops.dropblock_inject.drop_block in rand_ops


# ----------------------------------------------------------------------------------------------------------
# what the sparse kernel keeps for backward


@pytest.fixture
def redraws(monkeypatch):
    """Counts the sparse backward's redraws of the forward's seeds."""
    from dropblock_inject.ops import _sparse

    calls = []

    def counted(*args):
        calls.append(args)
        return redraw(*args)

    redraw = _sparse.redraw_corners
    monkeypatch.setattr(_sparse, "redraw_corners", counted)
    return calls


def test_traced_backward_reads_the_forward_corners_and_draws_no_seeds(redraws):
    m = torch.fx.symbolic_trace(DropBlock2d(3, 0.8).train())  # runs the registered op (compile: the mask op)
    check_grad(m, torch.rand(4, 8, 12, 12) + 0.5)
    check_grad(m, (torch.rand(4, 8, 12, 12) + 0.5).to(memory_format=torch.channels_last))
    assert not redraws  # the corners rode behind the 2-value state


def test_a_state_copied_on_its_way_to_backward_redraws_the_same_mask(redraws):
    def op(x):
        return OP(x, torch.tensor(0.8), 3, True, True)[0]

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):  # keeps the 2 values only
        check_grad(op, torch.rand(4, 8, 12, 12) + 0.5)
    assert len(redraws) == 1
