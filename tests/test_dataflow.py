"""The example forward's recorder: what it records, and that it leaves nothing behind."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropblock_inject.surgery.s10_dataflow import RecordError, record


class _Resizing(nn.Module):
    """Upsamples its input 2x before the first conv, caches a tensor on itself, and attends."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0)
        y = self.down(torch.relu(self.stem(x)))
        self.cache = y
        t = y.flatten(2)
        return torch.softmax(t @ t.transpose(1, 2), -1)


def test_records_ops_calls_and_strides_relative_to_the_first_conv():
    flow = record(_Resizing(), torch.randn(1, 3, 16, 16))
    kinds = [op.kind for op in flow.ops]
    assert kinds[:1] == ["resample"] and "conv" in kinds and "matmul" in kinds and "softmax" in kinds
    assert flow.reference == (32, 32)  # the resized image, not the example
    down = flow.calls_of("down")[0]
    assert flow.values[down.outputs[0]].stride == 4
    assert flow.values[flow.calls_of("stem")[0].outputs[0]].stride == 2
    conv_ops = [op for op in flow.ops if op.kind == "conv"]
    assert [op.scope for op in conv_ops] == ["stem", "down"]
    # provenance: the relu reads the stem conv's output value
    relu = next(op for op in flow.ops if op.name == "relu")
    assert relu.inputs == conv_ops[0].outputs and relu.scope == ""
    assert flow.outputs == flow.ops[-1].outputs


def test_leaves_nothing_on_the_model_and_draws_no_random_number():
    model = _Resizing().train()
    user_calls = []
    model.stem.register_forward_hook(lambda *a: user_calls.append(1))
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    x = torch.randn(1, 3, 16, 16)
    state = torch.get_rng_state()
    flow = record(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert flow.how == "empty batch"
    assert not hasattr(model, "cache") and model.training and model.stem.training
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert user_calls == [1]  # the user's own hook ran (callers that must hide it set it aside first)


def test_an_input_that_does_not_run_is_one_error_naming_the_shapes():
    with pytest.raises(RecordError, match=r"shapes \[\(1, 5, 8, 8\)\].*_Resizing"):
        record(_Resizing(), torch.randn(1, 5, 8, 8))


def test_two_threads_record_two_models_at_once():
    import torchvision

    models = [torchvision.models.resnet18(), _Resizing()]
    inputs = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 16, 16)]
    alone = [record(m, x) for m, x in zip(models, inputs)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        for _ in range(3):
            results[i] = record(models[i], inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        got = results[i]
        assert [(o.name, o.scope, o.inputs) for o in got.ops] == [(o.name, o.scope, o.inputs) for o in alone[i].ops]
        assert [c.path for c in got.calls] == [c.path for c in alone[i].calls]



def test_in_place_ops_make_new_values_and_pass_through_ops_none():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            y = self.conv(x)
            z = F.relu(self.drop(y), inplace=True)  # eval: dropout hands back y itself
            w = z * 2
            w += z
            return w

    flow = record(Net(), torch.randn(1, 3, 8, 8))
    conv, drop, relu, mul, add = (next(op for op in flow.ops if op.name == n)
                                  for n in ("conv2d", "dropout", "relu", "mul", "add_"))  # ``+=``
    assert drop.outputs == conv.outputs  # the same value: no new producer
    assert relu.inputs == conv.outputs and relu.outputs != conv.outputs
    assert add.inputs == mul.outputs + relu.outputs and add.outputs != mul.outputs
    assert flow.values[add.outputs[0]].producer == add.index and flow.outputs == add.outputs


def test_channels_last_tokens_have_no_stride():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 96, 4, 4)

        def forward(self, x):
            y = self.conv(x)  # (1, 96, 16, 12)
            return y, y.permute(0, 2, 3, 1)  # (1, 16, 12, 96): channels last

    flow = record(Net(), torch.randn(1, 3, 64, 48))
    assert [flow.values[v].stride for v in flow.outputs] == [4, None]


def test_convolutions_record_their_kernel_and_dilation():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dilated = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
            self.up = nn.ConvTranspose2d(4, 4, 2, 2, output_padding=1, dilation=3)

        def forward(self, x):
            return self.up(self.dilated(x))

    flow = record(Net(), torch.randn(1, 3, 8, 8))
    assert [(op.name, op.kernel, op.dilation) for op in flow.ops if op.kind == "conv"] == [
        ("conv2d", 3, 2), ("conv_transpose2d", 2, 3)]
