"""KeepProbScheduler: values along the ramp, per-rule scales, target override, resume, errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torchvision
from torch import nn

import dropblock_inject as dbi
from dropblock_inject import KeepProbScheduler
from dropblock_inject import injected_dropblocks

from _models import SmallResNet

TWO_GROUPS = {
    "dropblock": {"block_size": 3, "keep_prob": 0.9},
    "rules": [
        {"name": "group3", "modules": ["layer3.*"], "after": ["norm"], "shortcut": True, "drop_rate_scale": 0.25},
        {"name": "group4", "modules": ["layer4.*"], "after": ["norm"], "shortcut": True},
    ],
}


def TinyResNet() -> SmallResNet:  # noqa: N802 - reads as the class it was
    """A four-stage residual CNN, small enough for CPU tests."""
    return SmallResNet((("layer1", (1,)), ("layer2", (2,)), ("layer3", (2, 1)), ("layer4", (2,))))


def layer_of(db) -> str:
    return db.point.module.split(".")[0]


def expected(step: int, total: int, scale: float, *, start: float = 1.0, final: float = 0.9,
             ramp_fraction: float = 1.0) -> float:
    """The documented formula, written independently of the implementation."""
    start_m = 1 - (1 - start) * scale
    target_m = 1 - (1 - final) * scale
    return start_m - min(step / (ramp_fraction * total), 1) * (start_m - target_m)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run faster on one intra-op thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    return dbi.inject(torchvision.models.resnet18(), "resnet50_paper")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return dbi.inject(TinyResNet(), TWO_GROUPS)


def check_values(model: nn.Module, step: int, total: int, **kw) -> None:
    dbs = injected_dropblocks(model)
    assert dbs
    for db in dbs:
        scale = db.point.drop_rate_scale
        want = expected(step, total, scale, **kw)
        assert db.keep_prob == pytest.approx(want, abs=1e-12), (db.point, step)
        assert db.keep_prob_tensor.item() == pytest.approx(want, abs=1e-7)


# ----------------------------------------------------------------------------------------------------------
# values


def test_exported_from_package():
    assert dbi.KeepProbScheduler is KeepProbScheduler
    assert "KeepProbScheduler" in dbi.__all__


def test_resnet50_paper_values_along_the_ramp(resnet18):
    dbs = injected_dropblocks(resnet18)
    assert {layer_of(db) for db in dbs} == {"layer3", "layer4"}
    assert {db.point.drop_rate_scale for db in dbs if layer_of(db) == "layer3"} == {0.25}
    sched = KeepProbScheduler(resnet18, total_steps=100)
    # building the scheduler applies step 0: everything starts at keep_prob 1
    assert sched.last_step == 0
    assert all(db.keep_prob == 1.0 for db in dbs)
    assert sched.keep_prob == 1.0
    for step in (0, 1, 25, 50, 99, 100, 101, 10_000):
        assert sched.step(step) == sched.keep_prob
        assert sched.last_step == step
        check_values(resnet18, step, 100)
        assert sched.keep_prob == pytest.approx(expected(step, 100, 1.0), abs=1e-12)
    sched.step(50)
    for db in dbs:
        assert db.keep_prob == pytest.approx(0.95 if layer_of(db) == "layer4" else 0.9875, abs=1e-12)
    sched.step(100)  # the end: exactly the points' targets
    for db in dbs:
        assert db.keep_prob == db.point.keep_prob
        assert db.keep_prob == (0.9 if layer_of(db) == "layer4" else 0.975)
    assert sched.keep_prob == 0.9
    sched.step(250)  # past the end: clamped
    assert [db.keep_prob for db in dbs] == [db.point.keep_prob for db in dbs]


def test_target_override_keeps_per_rule_scale(resnet18):
    sched = KeepProbScheduler(resnet18, total_steps=40, target=0.8)
    assert sched.target == 0.8
    for step in (0, 10, 20, 40, 41):
        sched.step(step)
        check_values(resnet18, step, 40, final=0.8)
    for db in injected_dropblocks(resnet18):
        assert db.keep_prob == pytest.approx(0.8 if layer_of(db) == "layer4" else 0.95, abs=1e-12)
    assert sched.keep_prob == 0.8


def test_start_keep_prob_and_ramp_fraction_from_dict_recipe():
    recipe = copy.deepcopy(TWO_GROUPS)
    recipe["schedule"] = {"start_keep_prob": 0.96, "ramp_fraction": 0.5}
    model = dbi.inject(TinyResNet(), recipe)
    sched = KeepProbScheduler(model, total_steps=40)  # the ramp ends at step 20
    kw = dict(start=0.96, ramp_fraction=0.5)
    for step in (0, 5, 10, 19, 20, 21, 40, 80):
        sched.step(step)
        check_values(model, step, 40, **kw)
    sched.step(0)
    by_layer = {layer_of(db): db.keep_prob for db in injected_dropblocks(model)}
    assert by_layer == {"layer3": pytest.approx(1 - 0.04 * 0.25), "layer4": pytest.approx(0.96)}
    assert sched.keep_prob == pytest.approx(0.96)
    sched.step(10)  # half of the ramp
    by_layer = {layer_of(db): db.keep_prob for db in injected_dropblocks(model)}
    assert by_layer == {"layer3": pytest.approx(1 - 0.07 * 0.25), "layer4": pytest.approx(0.93)}
    assert sched.keep_prob == pytest.approx(0.93)
    sched.step(20)
    by_layer = {layer_of(db): db.keep_prob for db in injected_dropblocks(model)}
    assert by_layer == {"layer3": 0.975, "layer4": 0.9}
    # with a target, the start values still come from the recipe
    sched = KeepProbScheduler(model, total_steps=40, target=0.7)
    sched.step(10)
    check_values(model, 10, 40, final=0.7, **kw)


def test_rule_keep_prob_override_scales_with_target():
    recipe = {"dropblock": {"block_size": 3, "keep_prob": 0.9},
              "rules": [{"name": "g3", "modules": ["layer3.*"], "shortcut": True, "keep_prob": 0.8},
                        {"name": "g4", "modules": ["layer4.*"], "shortcut": True}]}
    model = dbi.inject(TinyResNet(), recipe)
    sched = KeepProbScheduler(model, total_steps=10)
    sched.step(10)
    assert {layer_of(db): db.keep_prob for db in injected_dropblocks(model)} == {
        "layer3": pytest.approx(0.8), "layer4": pytest.approx(0.9)}
    assert sched.keep_prob == pytest.approx(0.9)
    sched = KeepProbScheduler(model, total_steps=10, target=0.95)  # layer3 drops twice the rate
    sched.step(5)
    assert {layer_of(db): db.keep_prob for db in injected_dropblocks(model)} == {
        "layer3": pytest.approx(0.95), "layer4": pytest.approx(0.975)}
    sched.step(10)
    assert {layer_of(db): db.keep_prob for db in injected_dropblocks(model)} == {
        "layer3": pytest.approx(0.9), "layer4": pytest.approx(0.95)}


def test_values_are_clamped_to_unit_interval():
    recipe = {"dropblock": {"block_size": 3, "keep_prob": 0.9},
              "rules": [{"modules": ["layer4.*"], "shortcut": True, "drop_rate_scale": 4}]}
    model = dbi.inject(TinyResNet(), recipe)
    sched = KeepProbScheduler(model, total_steps=10, target=0.5)  # 1 - 0.5 * 4 < 0
    sched.step(10)
    assert all(db.keep_prob == 0.0 for db in injected_dropblocks(model))
    sched.step(5)  # a straight ramp from 1 to the clamped target
    assert all(db.keep_prob == pytest.approx(0.5) for db in injected_dropblocks(model))
    sched.step(1)
    assert all(db.keep_prob == pytest.approx(0.9) for db in injected_dropblocks(model))


def test_headline_without_a_scale_one_rule():
    recipe = {"dropblock": {"block_size": 3, "keep_prob": 0.8},
              "rules": [{"modules": ["layer3.*"], "shortcut": True, "drop_rate_scale": 0.5}]}
    model = dbi.inject(TinyResNet(), recipe)
    sched = KeepProbScheduler(model, total_steps=10)
    assert sched.keep_prob_at(10) == pytest.approx(0.8)
    sched.step(10)
    assert all(db.keep_prob == pytest.approx(0.9) for db in sched.dropblocks)


def test_pure_queries_change_nothing(tiny):
    sched = KeepProbScheduler(tiny, total_steps=20)
    sched.step(3)
    before = [db.keep_prob for db in sched.dropblocks]
    assert sched.keep_probs_at(10) == [expected(10, 20, db.point.drop_rate_scale) for db in sched.dropblocks]
    assert sched.keep_prob_at(10) == pytest.approx(0.95)
    assert [db.keep_prob for db in sched.dropblocks] == before
    assert sched.last_step == 3


# ----------------------------------------------------------------------------------------------------------
# idempotence, cost, resume


def test_step_is_idempotent_and_order_free(tiny):
    sched = KeepProbScheduler(tiny, total_steps=30)
    sched.step(12)
    first = [db.keep_prob for db in sched.dropblocks]
    sched.step(12)
    assert [db.keep_prob for db in sched.dropblocks] == first
    sched.step(29)
    sched.step(0)
    sched.step(12)
    assert [db.keep_prob for db in sched.dropblocks] == first
    assert [db.keep_prob_tensor.item() for db in sched.dropblocks] == pytest.approx(first, abs=1e-7)


def test_step_fills_buffers_in_place(tiny):
    sched = KeepProbScheduler(tiny, total_steps=30)
    buffers = [db.keep_prob_tensor for db in sched.dropblocks]
    pointers = [b.data_ptr() for b in buffers]
    for step in range(0, 40, 3):
        sched.step(step)
    assert all(db.keep_prob_tensor is b for db, b in zip(sched.dropblocks, buffers))
    assert [b.data_ptr() for b in buffers] == pointers
    assert [b.item() for b in buffers] == pytest.approx([db.keep_prob for db in sched.dropblocks], abs=1e-7)


def test_step_accepts_integer_like_values(tiny):
    sched = KeepProbScheduler(tiny, total_steps=30)
    sched.step(torch.tensor(15))
    assert sched.last_step == 15 and isinstance(sched.last_step, int)
    numpy = pytest.importorskip("numpy")
    sched = KeepProbScheduler(tiny, total_steps=numpy.int64(30))
    assert sched.total_steps == 30 and isinstance(sched.total_steps, int)


def test_resume_mid_ramp_matches_uninterrupted_run():
    torch.manual_seed(0)
    base = dbi.inject(TinyResNet(), TWO_GROUPS)
    resumed_model = copy.deepcopy(base)
    total = 50
    run = KeepProbScheduler(base, total_steps=total, target=0.85)
    trace_a = []
    saved = None
    for step in range(total + 5):
        run.step(step)
        trace_a.append([db.keep_prob for db in run.dropblocks])
        if step == 17:
            buf = io.BytesIO()
            torch.save(run.state_dict(), buf)
            saved = buf.getvalue()
    # a fresh process: new scheduler (different arguments on purpose), then the saved state
    fresh = KeepProbScheduler(resumed_model, total_steps=7)
    state = torch.load(io.BytesIO(saved), weights_only=True)
    assert state["total_steps"] == total and state["target"] == 0.85 and state["last_step"] == 17
    fresh.load_state_dict(state)
    assert fresh.total_steps == total and fresh.target == 0.85 and fresh.last_step == 17
    assert [db.keep_prob for db in fresh.dropblocks] == trace_a[17]
    for step in range(18, total + 5):
        fresh.step(step)
        assert [db.keep_prob for db in fresh.dropblocks] == trace_a[step]
    assert fresh.state_dict() == run.state_dict()


def test_step_without_argument_counts_like_torch_lr_schedulers(tiny):
    """No argument: the next step, counted as torch's LR schedulers count ``last_epoch``."""
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: epoch)
    sched = KeepProbScheduler(tiny, total_steps=8)
    assert sched.last_step == lr_sched.last_epoch == 0  # both constructors apply step 0
    explicit = copy.deepcopy(tiny)
    reference = KeepProbScheduler(explicit, total_steps=8)
    for _ in range(11):  # past the end of the ramp too
        opt.step()
        lr_sched.step()
        returned = sched.step()
        assert sched.last_step == lr_sched.last_epoch == opt.param_groups[0]["lr"]
        reference.step(sched.last_step)
        assert [db.keep_prob for db in sched.dropblocks] == [db.keep_prob for db in reference.dropblocks]
        assert returned == sched.keep_prob == pytest.approx(expected(sched.last_step, 8, 1.0), abs=1e-12)
    assert sched.last_step == 11 and sched.keep_prob == 0.9


def test_step_styles_mix(tiny):
    sched = KeepProbScheduler(tiny, total_steps=20)
    sched.step(10)
    sched.step()  # the step after the last one applied, whichever form applied it
    assert sched.last_step == 11
    check_values(tiny, 11, 20)
    sched.step(3)  # explicit steps may go back (idempotent, order free) ...
    sched.step()  # ... and counting continues from there
    assert sched.last_step == 4
    check_values(tiny, 4, 20)


def test_resume_of_a_counting_run_matches_uninterrupted_run():
    torch.manual_seed(0)
    model = dbi.inject(TinyResNet(), TWO_GROUPS)
    resumed_model = copy.deepcopy(model)
    run = KeepProbScheduler(model, total_steps=12)
    trace, saved = [], None
    for i in range(15):
        trace.append([db.keep_prob for db in run.dropblocks])  # the values training step i runs with
        run.step()  # after optimizer.step()
        if i == 5:
            buf = io.BytesIO()
            torch.save(run.state_dict(), buf)  # a checkpoint written after step 5
            saved = buf.getvalue()
    fresh = KeepProbScheduler(resumed_model, total_steps=12)
    fresh.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    assert fresh.last_step == 6  # training resumes with step 6
    for i in range(6, 15):
        assert [db.keep_prob for db in fresh.dropblocks] == trace[i]
        fresh.step()
    assert fresh.state_dict() == run.state_dict()


def test_state_dict_round_trip(tiny):
    sched = KeepProbScheduler(tiny, total_steps=12)
    sched.step(4)
    other = KeepProbScheduler(tiny, total_steps=99, target=0.5)
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()
    assert other.keep_prob == sched.keep_prob
    assert "KeepProbScheduler(" in repr(other) and "last_step=4" in repr(other)


def test_scheduler_drives_the_forward_pass(tiny):
    """keep_prob set by the scheduler is what the injected forward uses: at keep 1 train == plain train."""
    plain = copy.deepcopy(tiny)
    dbi.strip(plain)
    x = torch.randn(2, 3, 16, 16)
    sched = KeepProbScheduler(tiny, total_steps=10)
    tiny.train(), plain.train()
    sched.step(0)
    torch.manual_seed(1)
    a = tiny(x)
    torch.manual_seed(1)
    b = plain(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    sched = KeepProbScheduler(tiny, total_steps=10, target=0.0)
    sched.step(10)
    feats = {}
    tiny.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("out", o))
    tiny(x)
    assert torch.count_nonzero(feats["out"]) == 0  # every unit of layer4 dropped at keep_prob 0


# ----------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("total", [0, -3])
def test_non_positive_total_steps(tiny, total):
    with pytest.raises(ValueError, match=rf"total_steps.*{total}"):
        KeepProbScheduler(tiny, total)


@pytest.mark.parametrize("total", [10.0, "10", None, True, math.inf])
def test_non_int_total_steps(tiny, total):
    with pytest.raises(TypeError, match="total_steps must be an int"):
        KeepProbScheduler(tiny, total)


def test_negative_or_non_int_step(tiny):
    sched = KeepProbScheduler(tiny, total_steps=10)
    with pytest.raises(ValueError, match="global_step must be >= 0, but got -1"):
        sched.step(-1)
    with pytest.raises(TypeError, match="global_step must be an int"):
        sched.step(1.5)
    with pytest.raises(ValueError, match="-2"):
        sched.keep_prob_at(-2)
    assert sched.last_step == 0


@pytest.mark.parametrize("target", [1.5, -0.1, math.nan])
def test_target_outside_unit_interval(tiny, target):
    with pytest.raises(ValueError, match="target must be a keep_prob in"):
        KeepProbScheduler(tiny, 10, target=target)


@pytest.mark.parametrize("target", ["0.9", True])
def test_target_of_wrong_type(tiny, target):
    with pytest.raises(TypeError, match="target"):
        KeepProbScheduler(tiny, 10, target=target)


def test_model_without_dropblock():
    with pytest.raises(ValueError, match=r"dropblock_inject\.inject"):
        KeepProbScheduler(TinyResNet(), 10)
    model = dbi.inject(TinyResNet(), TWO_GROUPS)
    dbi.strip(model)
    with pytest.raises(ValueError, match="call dropblock_inject.inject"):
        KeepProbScheduler(model, 10)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        KeepProbScheduler([model], 10)
    # a DropBlock the user added by hand is not the scheduler's business
    with pytest.raises(ValueError, match="inject"):
        KeepProbScheduler(nn.Sequential(dbi.DropBlock2d(3, 0.9)), 10)


def test_bad_state_dict(tiny):
    sched = KeepProbScheduler(tiny, total_steps=10)
    with pytest.raises(ValueError, match="last_step"):
        sched.load_state_dict({"total_steps": 10, "target": None})
    with pytest.raises(ValueError, match="total_steps"):
        sched.load_state_dict({"total_steps": 0, "target": None, "last_step": 0})
    assert sched.state_dict()["total_steps"] == 10  # unchanged after a failed load


# ----------------------------------------------------------------------------------------------------------
# argument checks: clear errors, numbers of any size, nothing changed on an error


@pytest.mark.parametrize("kwargs, error, match", [
    ({"total_steps": 10**400}, ValueError, r"total_steps must be a positive int of at most 2\*\*63 - 1"),
    ({"total_steps": 2**63}, ValueError, "total_steps"),
    ({"total_steps": 10, "target": 10**500}, ValueError, r"target must be a keep_prob in \[0, 1\]"),
    ({"total_steps": 10, "target": -(10**4000)}, ValueError,
     r"target must be a keep_prob in \[0, 1\], but got -<an integer of about 4001 digits>"),
    ({"total_steps": 10, "target": float("nan")}, ValueError, "target"),
    ({"total_steps": None}, TypeError, "total_steps must be an int"),
])
def test_constructor_numbers_out_of_range(tiny, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        KeepProbScheduler(tiny, **kwargs)
    assert len(str(info.value)) < 300


def test_huge_steps_hold_the_target(tiny):
    sched = KeepProbScheduler(tiny, total_steps=2**63 - 1)
    assert sched.keep_prob_at(10**400) == pytest.approx(0.9)
    assert sched.step(10**400) == pytest.approx(0.9)


@pytest.mark.parametrize("state, error, match", [
    (None, TypeError, r"load_state_dict\(\): state_dict must be the dict that KeepProbScheduler.state_dict\(\)"),
    ([("total_steps", 10)], TypeError, "state_dict must be"),
    ({"total_steps": 10, "target": None}, ValueError, r"missing \['last_step'\]"),
    ({"total_steps": 10, "target": None, "last_step": 0, "extra": 1}, ValueError, "unknown keys"),
    ({"version": 99, "total_steps": 10, "target": None, "last_step": 0}, ValueError, "version 99"),
    ({"total_steps": 10**400, "target": None, "last_step": 0}, ValueError, r"state_dict\['total_steps'\]"),
    ({"total_steps": 10, "target": "0.9", "last_step": 0}, TypeError, r"state_dict\['target'\]"),
    ({"total_steps": 10, "target": None, "last_step": -1}, ValueError, r"state_dict\['last_step'\]"),
])
def test_load_state_dict_checks_its_argument_first(tiny, state, error, match):
    sched = KeepProbScheduler(tiny, total_steps=10)
    sched.step(4)
    before = (sched.state_dict(), [db.keep_prob for db in sched.dropblocks])
    with pytest.raises(error, match=match):
        sched.load_state_dict(state)
    assert (sched.state_dict(), [db.keep_prob for db in sched.dropblocks]) == before
