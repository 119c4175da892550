"""How the example forward runs: the meta device (small constants real, no random draw), an empty batch,
a real forward where both fail, and the model's attributes put back."""

from __future__ import annotations

import torch
from torch import nn

from dropblock_inject.surgery.s10_dataflow import record


class _NeedsValues(nn.Module):
    """Reads a value (no meta), and a flatten with -1 (no empty batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).reshape(x.shape[0], 4, -1)
        return y * float(y.abs().max() > -1)


def test_falls_back_to_a_real_forward_where_meta_and_an_empty_batch_fail():
    flow = record(_NeedsValues(), torch.randn(2, 3, 8, 8))
    assert flow.how == "real" and flow.values[flow.outputs[0]].shape == (2, 4, 36)


def test_meta_forward_leaves_real_attributes():
    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.anchors = torch.zeros(1)

        def forward(self, x):
            y = self.conv(x).view(x.shape[0], 4, -1)  # no empty batch: meta
            self.anchors = y.new_zeros(3)
            return y

    model = Cached()
    flow = record(model, torch.randn(1, 3, 8, 8))
    assert flow.how == "meta" and model.anchors.device.type == "cpu" and model.anchors.shape == (1,)


class _Masked(nn.Module):
    """Makes a padding mask, moves it to the input's device and tests it (as Hugging Face's DETR does), and
    draws noise on the default device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).view(x.shape[0], 4, -1)  # no empty batch
        mask = torch.ones(x.shape[0], y.shape[-1], device=x.device).to(y.device)
        if not mask.all():
            raise AssertionError("mask")
        return y * mask[:, None] + 0 * torch.randn(y.shape)


def test_meta_forward_reads_small_masks_it_made_and_draws_no_random_number():
    model, x = _Masked(), torch.randn(1, 3, 8, 8)
    state = torch.get_rng_state()
    flow = record(model, x)
    assert flow.how == "meta"
    assert torch.equal(torch.get_rng_state(), state)


def test_grid_sample_on_meta_has_the_grid_s_size():
    class Sampler(nn.Module):
        def forward(self, x):
            grid = x.new_zeros(x.shape[0], 5, 7, 2)
            return torch.nn.functional.grid_sample(x.view(x.shape[0], 3, 8, -1), grid, align_corners=False)

    flow = record(Sampler(), torch.randn(1, 3, 8, 8))
    assert flow.how == "meta" and flow.values[flow.outputs[0]].shape == (1, 3, 5, 7)


def test_attention_on_large_real_tensors_runs_on_meta():
    """``scaled_dot_product_attention`` on large tensors the model holds (learned queries and memory, real on
    the meta forward) runs on meta: its CPU kernel is tagged random (for its dropout) and takes no device
    argument, which was given it; the forward fell back to a real one, and a model that cannot run on an
    empty batch either (Hugging Face MaskFormer) lost its dataflow."""
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.memory = nn.Parameter(torch.randn(1, 2, 4096, 128))

        def forward(self, x):
            y = self.conv(x).reshape(x.shape[0], 8, 2, -1)  # -1 is ambiguous on an empty batch
            a = torch.nn.functional.scaled_dot_product_attention(self.memory, self.memory, self.memory)
            return y, a

    flow = record(Attend(), torch.randn(1, 3, 64, 64))
    assert flow.how == "meta" and flow.values[flow.outputs[1]].shape == (1, 2, 4096, 128)


def test_meta_shapes_are_the_real_forward_s():
    from dropblock_inject.surgery.s10_dataflow import _run

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.norm = nn.LayerNorm(8)
            self.qkv = nn.Linear(8, 24)
            self.act = nn.GELU()

        def forward(self, x):
            t = self.norm(torch.relu(self.conv(x)).flatten(2).transpose(1, 2))
            q, k, v = self.qkv(t).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(1, 2), -1, dtype=torch.float64).float() @ v
            grid = torch.sigmoid(a[..., :2]).reshape(x.shape[0], 4, 4, 2) * 2 - 1
            return self.act(torch.nn.functional.grid_sample(torch.tanh(x), grid, align_corners=False)), a

    model, x = Block(), torch.randn(2, 3, 8, 8)
    meta, real = _run(model, (x.to("meta"),), "meta"), _run(model, (x,), "real")
    assert [v.shape for v in meta.values] == [v.shape for v in real.values]
    assert [(o.name, o.inputs) for o in meta.ops] == [(o.name, o.inputs) for o in real.ops]
