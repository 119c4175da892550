"""One source of truth for keep_prob: the float and the ``keep_prob_tensor`` buffer never disagree.

The float is what eager code and ``repr`` read, the buffer what compiled graphs, exported programs and fx
graphs read; each way a module is moved, converted, materialised, loaded, copied or unpickled must leave
them equal.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _dropblock_stats import TOL, expected_drop_fraction
from torch import nn

import dropblock_inject as dbi
from dropblock_inject import DropBlock2d, DropBlock3d


def agree(m: nn.Module, value: float) -> None:
    """Every DropBlock of ``m`` holds ``value`` in its float and, as an fp32 scalar, in its buffer."""
    blocks = [b for b in m.modules() if isinstance(b, (DropBlock2d, DropBlock3d))]
    assert blocks
    for b in blocks:
        assert b.keep_prob == value
        assert b.keep_prob_tensor.dtype == torch.float32 and b.keep_prob_tensor.shape == ()
        assert b.keep_prob_tensor.item() == pytest.approx(value, abs=1e-7)


def test_half_and_double_keep_the_buffer_exact_fp32():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), DropBlock2d(3, 0.9))
    m.half()
    agree(m, 0.9)  # an fp16 buffer would hold 0.89990234375
    m.double()
    agree(m, 0.9)
    m[1].keep_prob = 0.85
    agree(m, 0.85)
    m.to(torch.bfloat16).float()
    agree(m, 0.85)


def test_meta_init_then_to_empty_then_load_state_dict():
    with torch.device("meta"):
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), DropBlock2d(3, 0.9))
    m[2].keep_prob = 0.8  # set while on meta: the buffer cannot hold it, the float does
    m.to_empty(device="cpu")
    agree(m, 0.8)  # not the uninitialised memory to_empty leaves
    m.load_state_dict(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict())
    agree(m, 0.8)
    m.load_state_dict(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), assign=True)
    agree(m, 0.8)


def test_meta_init_inject_materialise_then_compile():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DropBlock2d(3, 1.0))
    model[1].keep_prob = 0.7
    model.to_empty(device="cpu")
    nn.init.zeros_(model[0].weight)
    nn.init.ones_(model[0].bias)
    agree(model, 0.7)
    torch._dynamo.reset()
    compiled = torch.compile(model.train(), backend="aot_eager", fullgraph=True)
    y = compiled(torch.randn(256, 3, 12, 12)).detach()
    assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(0.7, 3, (12, 12)), abs=TOL)
    torch._dynamo.reset()


def test_deepcopy_and_save_load_agree():
    m = DropBlock3d(3, 0.6)
    c = copy.deepcopy(m)
    agree(c, 0.6)
    c.keep_prob = 0.5
    agree(c, 0.5)
    agree(m, 0.6)
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    agree(torch.load(buf, weights_only=False), 0.5)


def test_unpickling_repairs_a_disagreeing_buffer_and_an_old_layout():
    m = DropBlock2d(5, 0.9)
    # a module saved by the earlier code after .half(): that code left the buffer in fp16 (0.8999...)
    del m.__dict__["keep_prob_tensor"]  # earlier code: a non-persistent buffer, not an attribute
    m._buffers["keep_prob_tensor"] = torch.tensor(0.9, dtype=torch.float16)
    m._non_persistent_buffers_set.add("keep_prob_tensor")
    loaded = pickle.loads(pickle.dumps(m))
    agree(loaded, 0.9)
    assert "keep_prob_tensor" not in dict(loaded.named_buffers())  # moved out of the buffers
    # the attribute set of the earliest code, without the float: the buffer is then the only record
    old = DropBlock2d(5, 0.75)
    del old.__dict__["_keep_prob"]
    old._buffers["keep_prob_tensor"] = old.__dict__.pop("keep_prob_tensor")
    old._non_persistent_buffers_set.add("keep_prob_tensor")
    loaded = pickle.loads(pickle.dumps(old))
    agree(loaded, 0.75)
    assert loaded.state_dict() == {} and not list(loaded.buffers())


# pickle.dumps(DropBlock2d(5, 0.9, per_channel=False).half() with keep_prob then set to 0.8, protocol=4),
# made by the code of `git show main:dropblock_inject/ops.py` before ops became a package (zlib, base64):
# the class path dropblock_inject.ops.DropBlock2d, that code's attribute set, and the fp16 buffer its
# .half() left behind (0.7998046875 next to the float 0.8).
PREVIOUS_RELEASE_PICKLE = (
    "eNp9k8tOFEEUhucqpEcQUUkEY1wOmwkZwYgbEyVqMhEVN70xJ9Xd1dPFFFVdl4ZgQoILEzCVaGK50PgAPodvwyOYsPA0A8gAsRfd"
    "6f98da51dhvfftcrR4+7mWiZR1zGA2Binca2I3PjXWsF5Sel3E38Vz//we/4thu3mjDBRN/vuRbkRJMNaqk2aHTjEBVpevwzNaA0"
    "h1zLCCwVRmrvrlqp46wDhWUcA0yDplHBeHIMwGYX47TdxBAz+CF9ip6AS5JAquUGRNuWGqSeHu7WPgX88OezP/fWf72+3dmtvTyo"
    "43tHVdrhFJaFka2MJYdNTIhJoaoIhBNo4cxaToGKhBGhanthgKLdzikY9p4aVd9RjXbYRNFkUlvV7NXCsldMWHWl1wgbpQ8p+mqs"
    "1ygKjNkOx0p4mK+qxEf5By8IT98OtUBVw0lElhcfdJeWHi507y8vLyyqods4L1S9V121qvEGnb1TlcvYKulUh/OqpI/8R7/me5X5"
    "+X3XwhI5zgwrLGf2SidU02SFxbac2Zq3SBo3B0IKyMtOGGy2PRkUGGr9Z9/Ogi/uBkQkHmwRneDUKGRSDozPZtCHu/bPdFaeAWYg"
    "LTgfNftVNwmp1Bf42VEVtpjNoDzXPyHunCMI3yLbBmKCNSbHzPQpcz7Nuxctl8S4DsYSSyHBHo0cv3XWcN737PAS/oeYu0hIMxph"
    "HDZkUnB6tCDBcOXKO+d7TdfC6UCcESEo9/uuabBoiks2xkTOSUxRC+B0p/zzxwffy+dHEXX+AnKSZLw="
)


def test_module_pickled_by_the_previous_release_loads_and_works():
    import base64
    import zlib

    module = pickle.loads(zlib.decompress(base64.b64decode(PREVIOUS_RELEASE_PICKLE)))
    assert type(module) is DropBlock2d and module.block_size == 5 and not module.per_channel
    agree(module, 0.8)  # the buffer re-derived from the float: fp32 again, and 0.8
    y = module.train()(torch.ones(4096, 2, 10, 10))
    assert float((y == 0).double().mean()) == pytest.approx(expected_drop_fraction(0.8, 5, (10, 10)), abs=TOL)
    module.keep_prob = 0.6
    agree(module, 0.6)


def test_injected_model_to_and_half_keep_every_dropblock_in_agreement():
    import torchvision

    model = dbi.inject(torchvision.models.resnet18(), "paper_generic")
    sched = dbi.KeepProbScheduler(model, total_steps=10)
    sched.step(5)
    values = {b: b.keep_prob for b in dbi.injected_dropblocks(model)}
    model.half()
    for b, v in values.items():
        assert b.keep_prob_tensor.dtype == torch.float32 and b.keep_prob_tensor.item() == pytest.approx(v)
