"""Two CPU processes (gloo) train an injected model under DDP: every rank sets the same keep_prob at every step."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dropblock_inject as dbi
from dropblock_inject import injected_dropblocks

from _models import SmallResNet

WORLD_SIZE = 2
STEPS = 6
TOTAL_STEPS = 4  # shorter than the run, so the clamp past the end is exercised too
RECIPE = {
    "dropblock": {"block_size": 3, "keep_prob": 0.8},
    "schedule": {"start_keep_prob": 0.95, "ramp_fraction": 1.0},
    "rules": [
        {"name": "group3", "modules": ["layer3.*"], "shortcut": True, "drop_rate_scale": 0.25},
        {"name": "group4", "modules": ["layer4.*"], "shortcut": True},
    ],
}


def SmallNet() -> SmallResNet:  # noqa: N802
    return SmallResNet((("layer3", (2, 1)), ("layer4", (2,))), num_classes=4, stem_norm=False, project=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = dbi.inject(SmallNet(), RECIPE)
        ddp = nn.parallel.DistributedDataParallel(model)
        before = [p.detach().clone() for p in model.parameters()]
        # built on the DDP wrapper: the DropBlocks are found through it
        sched = dbi.KeepProbScheduler(ddp, total_steps=TOTAL_STEPS)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard (and its own masks)
        record = {"rank": rank, "steps": [], "buffers": [], "losses": [], "scales": []}
        record["scales"] = [db.point.drop_rate_scale for db in injected_dropblocks(model)]
        ddp.train()
        for step in range(STEPS):
            sched.step(step)
            dbs = injected_dropblocks(model)
            record["steps"].append([db.keep_prob for db in dbs])
            x = torch.randn(4, 3, 16, 16, generator=g)
            y = torch.randint(0, 4, (4,), generator=g)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # after the forward: DDP's buffer broadcast must not have changed anything either
            record["buffers"].append([db.keep_prob_tensor.item() for db in dbs])
            record["losses"].append(loss.item())
        record["changed"] = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(params) for _ in range(world_size)]
        dist.all_gather(gathered, params)
        record["params_in_sync"] = all(torch.equal(gathered[0], t) for t in gathered)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()  # no rank tears gloo down while another still talks to it (an abort on a busy machine)
    finally:
        dist.destroy_process_group()


def _expected(step: int, scale: float) -> float:
    start = 1 - (1 - 0.95) * scale
    target = 1 - (1 - 0.8) * scale
    return start - min(step / TOTAL_STEPS, 1) * (start - target)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo")
def test_ddp_ranks_agree_on_keep_prob(tmp_path):
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    first = records[0]
    assert len(first["steps"]) == STEPS and len(first["steps"][0]) == len(first["scales"]) > 0
    assert sorted(set(first["scales"])) == [0.25, 1.0]
    for rec in records[1:]:
        assert rec["steps"] == first["steps"]  # bit-identical on every rank at every step
        assert rec["buffers"] == first["buffers"]
    for rec in records:
        for step, (values, buffers) in enumerate(zip(rec["steps"], rec["buffers"])):
            want = [_expected(step, s) for s in rec["scales"]]
            assert values == pytest.approx(want, abs=1e-12), (rec["rank"], step)
            assert buffers == pytest.approx(values, abs=1e-7)
        assert all(math.isfinite(v) for v in rec["losses"])
        assert all(rec["changed"])  # every parameter was trained
        assert rec["params_in_sync"]  # DDP kept the replicas identical
    # the ranks saw different data, so their losses differ: the training really ran per rank
    assert records[0]["losses"] != records[1]["losses"]
