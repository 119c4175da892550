"""EMA / SWA copies of an injected model (timm ``ModelEmaV3``, ``torch.optim.swa_utils.AveragedModel``): they
update, evaluate as their stripped copy, train with their own DropBlocks, and strip through the wrapper."""

import copy

import pytest
import timm.utils
import torch
from _models import SmallResNet, X, same_state, set_keep
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dropblock_inject as dbi

EMAS = {
    "ModelEmaV3": (lambda m: timm.utils.ModelEmaV3(m, decay=0.5), lambda ema, m, step: ema.update(m, step)),
    "AveragedModel": (lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True),
                      lambda ema, m, step: ema.update_parameters(m)),
}


@pytest.mark.parametrize("order", ["inject_then_copy", "copy_then_inject"])
@pytest.mark.parametrize("name", EMAS)
def test_ema_of_an_injected_model(name, order):
    """The EMA copy made of the injected model, or of the plain one and injected through its wrapper."""
    make, update = EMAS[name]
    model = SmallResNet().train()
    if order == "inject_then_copy":
        dbi.inject(model, "resnet50_paper")
        ema = make(model)
    else:
        ema = make(model)
        dbi.inject(model, "resnet50_paper")
        assert dbi.inject(ema, "resnet50_paper") is ema
    inner = ema.module
    assert len(dbi.injected_dropblocks(inner)) == 12  # the copy is injected too (deepcopy)
    sched = dbi.KeepProbScheduler(model, total_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = copy.deepcopy(inner.state_dict())
    for step in range(3):
        sched.step(step)
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
        update(ema, model, step)
    assert not same_state(inner, start) and not same_state(inner, model.state_dict())  # averaged, not copied
    inner.eval()
    stripped = dbi.strip(copy.deepcopy(inner))
    assert torch.equal(ema(X), stripped(X))  # evaluates as the plain network with the averaged weights

    inner.train()  # and trains with its own DropBlocks
    set_keep(inner, 0.5)
    fired = []
    hooks = [d.register_forward_hook(lambda *a: fired.append(1)) for d in dbi.injected_dropblocks(inner)]
    ema(X).sum().backward()
    assert len(fired) == 12 and all(p.grad is not None for p in inner.parameters())
    for h in hooks:
        h.remove()

    keys = list(ema.state_dict())
    before = ema.eval()(X)
    assert dbi.strip(ema) is ema
    assert dbi.injected_dropblocks(ema) == [] and list(ema.state_dict()) == keys
    assert torch.equal(ema(X), before)


def test_averaged_buffers_leave_keep_prob_float_and_buffer_agreeing():
    model = SmallResNet().train()
    dbi.inject(model, "resnet50_paper")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    set_keep(model, 0.5)
    ema.update_parameters(model)
    assert all(d.keep_prob_tensor.item() == pytest.approx(d.keep_prob) for d in dbi.injected_dropblocks(ema))
