"""Pictures (dropblock_inject.viz) and the ``viz`` subcommand."""

import sys

import numpy as np
import pytest
import torch
import torchvision

import dropblock_inject as dbi
from dropblock_inject import viz
from dropblock_inject.cli import main

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    """The decoded image, after checking the file is a non-empty PNG."""
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100
    return image


@pytest.fixture(scope="module")
def resnet18_points():
    return dbi.plan(torchvision.models.resnet18(weights=None), "resnet50_paper")


# ----------------------------------------------------------------------------------------------------------
# masks


def brute_force_expected_drop(size, block_size, keep_prob):
    """Expected dropped fraction by enumerating, for every position, the valid seeds whose block covers it."""
    h, w = size
    bh, bw = min(block_size, h), min(block_size, w)
    gamma = (1 - keep_prob) / (bh * bw) * (h * w) / ((h - bh + 1) * (w - bw + 1))
    kept = 0.0
    for r in range(h):
        for c in range(w):
            n = sum(1 for i in range(h - bh + 1) for j in range(w - bw + 1) if i <= r < i + bh and j <= c < j + bw)
            kept += (1 - gamma) ** n
    return 1 - kept / (h * w)


@pytest.mark.parametrize("size, block_size, keep_prob", [((9, 11), 3, 0.9), ((7, 7), 7, 0.5), ((6, 13), 4, 0.75),
                                                         ((5, 5), 9, 0.8)])
def test_expected_drop_fraction_matches_enumeration(size, block_size, keep_prob):
    assert viz.expected_drop_fraction(size, block_size, keep_prob) == pytest.approx(
        brute_force_expected_drop(size, block_size, keep_prob), rel=1e-12)


def test_expected_drop_fraction_is_below_the_nominal_rate_when_blocks_overlap():
    # with block 1 nothing overlaps: exactly 1 - keep_prob; larger blocks overlap and drop less
    assert viz.expected_drop_fraction((40, 40), 1, 0.7) == pytest.approx(0.3)
    assert viz.expected_drop_fraction((40, 40), 7, 0.7) < 0.3 - 0.02


def assert_made_of_blocks(keep, block_size):
    """Every dropped cell of each (H, W) mask lies in a fully dropped block_size x block_size square."""
    dropped = (~keep).float()[:, None]
    k = block_size
    anchors = (torch.nn.functional.avg_pool2d(dropped, k, stride=1) == 1).float()  # fully dropped windows
    covered = torch.nn.functional.max_pool2d(torch.nn.functional.pad(anchors, (k - 1,) * 4), k, stride=1)
    assert torch.equal(covered > 0, dropped > 0)


def test_mask_panels_measure_what_the_op_drops():
    block_sizes, keep_probs = (3, 7), (0.9, 0.5)
    panels = viz.mask_panels((40, 60), block_sizes=block_sizes, keep_probs=keep_probs, channels=64,
                             per_channel=True, seed=3)
    assert [(p.block_size, p.keep_prob) for p in panels] == [(b, k) for b in block_sizes for k in keep_probs]
    for p in panels:
        assert p.keep.dtype == torch.bool and p.keep.shape == (64, 40, 60)
        assert not torch.equal(p.keep[0], p.keep[1])  # independent masks per channel
        assert p.dropped == pytest.approx(1 - p.keep.float().mean().item())
        assert p.expected == pytest.approx(viz.expected_drop_fraction((40, 60), p.block_size, p.keep_prob))
        # 64 independent 40x60 masks: the measured fraction is within a few standard deviations
        assert abs(p.dropped - p.expected) < 0.04
        assert_made_of_blocks(p.keep, p.block_size)


def test_shared_masks_are_one_mask_per_sample_and_drop_the_expected_fraction():
    dropped = {0.9: [], 0.6: []}
    for seed in range(30):
        for p in viz.mask_panels((30, 40), block_sizes=(5,), keep_probs=tuple(dropped), channels=3, seed=seed):
            assert torch.equal(p.keep, p.keep[:1].expand_as(p.keep))
            assert_made_of_blocks(p.keep[:1], 5)
            dropped[p.keep_prob].append(p.dropped)
    for keep_prob, values in dropped.items():
        assert np.mean(values) == pytest.approx(viz.expected_drop_fraction((30, 40), 5, keep_prob), abs=0.03)


def test_mask_panels_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = viz.mask_panels((20, 20), block_sizes=(3,), keep_probs=(0.7,), seed=5)
    after = torch.rand(3)
    b = viz.mask_panels((20, 20), block_sizes=(3,), keep_probs=(0.7,), seed=5)
    c = viz.mask_panels((20, 20), block_sizes=(3,), keep_probs=(0.7,), seed=6)
    assert torch.equal(before, after)
    assert torch.equal(a[0].keep, b[0].keep) and not torch.equal(a[0].keep, c[0].keep)


def test_representative_draws_pick_the_seed_nearest_the_expectation():
    size, kw = (75, 113), dict(block_sizes=(3, 7, 15), keep_probs=(0.9, 0.75, 0.5))  # chelsea at stride 4
    singles = [viz.mask_panels(size, seed=s, **kw) for s in range(2, 7)]
    chosen = viz.mask_panels(size, seed=2, draws=5, **kw)
    assert [(p.block_size, p.keep_prob) for p in chosen] == [(p.block_size, p.keep_prob) for p in singles[0]]
    for i, panel in enumerate(chosen):
        candidates = [grid[i] for grid in singles]  # draw k of the grid is what seed 2 + k alone draws
        errors = [abs(c.dropped - c.expected) for c in candidates]
        k = errors.index(min(errors))
        assert panel.seed == 2 + k and panel.draws == 5
        assert torch.equal(panel.keep, candidates[k].keep) and panel.dropped == candidates[k].dropped
        assert panel.title == (f"block {panel.block_size}, keep {panel.keep_prob:g}, seed {2 + k} of 5\n"
                               f"dropped {panel.dropped:.1%} (expected {panel.expected:.1%})")
    assert all(p.seed == 0 and p.draws == 1 for p in viz.mask_panels(size, **kw))
    assert "seed" not in viz.mask_panels(size, **kw)[0].title


def test_the_default_picture_has_no_unrepresentative_panel():
    """The issue's case: seed 0 alone drops nothing at block 15, keep 0.9; the chosen draws are all typical."""
    size = (75, 113)
    single = viz.mask_panels(size)
    assert (single[6].block_size, single[6].keep_prob, single[6].dropped) == (15, 0.9, 0.0)
    for panel in viz.mask_panels(size, draws=5):
        assert abs(panel.dropped - panel.expected) < 0.35 * panel.expected
    with pytest.raises(ValueError, match="draws"):
        viz.mask_panels(size, draws=0)


def test_plot_masks_writes_a_png_of_the_photo_grid(tmp_path):
    out = viz.plot_masks(tmp_path / "masks.png", block_sizes=(3, 7), keep_probs=(0.9, 0.75, 0.5))
    assert out == tmp_path / "masks.png"
    image = read_png(out)
    assert image.shape[1] > image.shape[0]  # three columns of a landscape photo, two rows


def test_plot_masks_takes_an_image_array_or_tensor(tmp_path):
    grey = np.linspace(0, 255, 64 * 96, dtype=np.float64).reshape(64, 96).astype(np.uint8)
    read_png(viz.plot_masks(tmp_path / "grey.png", image=grey, block_sizes=(3,), keep_probs=(0.8,), stride=2))
    read_png(viz.plot_masks(tmp_path / "chw.png", image=torch.rand(3, 48, 48), block_sizes=(5,), keep_probs=(0.5,),
                            per_channel=True, stride=1))
    with pytest.raises(ValueError, match="image must be"):
        viz.plot_masks(tmp_path / "bad.png", image=np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="stride"):
        viz.plot_masks(tmp_path / "bad.png", image=grey, stride=0)


# ----------------------------------------------------------------------------------------------------------
# schedule


def test_schedule_curves_one_per_distinct_ramp(tmp_path):
    model = dbi.inject(torchvision.models.resnet18(weights=None), "resnet50_paper")
    sched = dbi.KeepProbScheduler(model, total_steps=1000)
    sched.step(400)
    curves = viz.schedule_curves(sched, num_points=11)
    assert [(c.label, c.count) for c in curves] == [("layer3 (group3)", 6), ("layer4 (group4)", 6)]
    layer3, layer4 = curves
    assert layer3.steps == tuple(range(0, 1001, 100))
    for curve, target in ((layer3, 0.975), (layer4, 0.9)):
        assert curve.keep_probs[0] == 1.0 and curve.keep_probs[-1] == pytest.approx(target)
        expected = [1 - s / 1000 * (1 - target) for s in curve.steps]
        assert curve.keep_probs == pytest.approx(expected)
    # the scheduler was only read
    assert sched.last_step == 400 and sched.keep_prob == pytest.approx(1 - 0.4 * 0.1)
    out = viz.plot_schedule(tmp_path / "schedule.png", sched)
    read_png(out)


def test_schedule_curves_with_a_target_and_a_short_run():
    model = dbi.inject(torchvision.models.resnet18(weights=None), "resnet50_paper")
    sched = dbi.KeepProbScheduler(model, total_steps=3, target=0.8)
    curves = viz.schedule_curves(sched)
    assert [c.steps for c in curves] == [(0, 1, 2, 3)] * 2
    assert [c.keep_probs[-1] for c in curves] == pytest.approx([0.95, 0.8])
    with pytest.raises(TypeError, match="KeepProbScheduler"):
        viz.schedule_curves(model)


# ----------------------------------------------------------------------------------------------------------
# plan


def test_plan_counts_equal_the_plan(resnet18_points):
    rows = viz.plan_counts(resnet18_points)
    assert rows == [viz.StageCount("layer3", 4, 2), viz.StageCount("layer4", 4, 2)]
    for row in rows:
        stage_points = [p for p in resnet18_points if p.module.startswith(row.stage + ".")]
        assert row.branch == sum(p.kind == "branch" for p in stage_points)
        assert row.shortcut == sum(p.kind == "shortcut" for p in stage_points)
    assert sum(r.branch + r.shortcut for r in rows) == len(resnet18_points)
    assert viz.plan_counts(resnet18_points, level=2) == [
        viz.StageCount("layer3.0", 2, 1), viz.StageCount("layer3.1", 2, 1),
        viz.StageCount("layer4.0", 2, 1), viz.StageCount("layer4.1", 2, 1)]


def test_plan_counts_resnet50_paper_is_27_branch_9_shortcut():
    points = dbi.plan(torchvision.models.resnet50(weights=None), "resnet50_paper")
    assert viz.plan_counts(points) == [viz.StageCount("layer3", 18, 6), viz.StageCount("layer4", 9, 3)]


def test_plot_plan_writes_a_png(tmp_path, resnet18_points):
    read_png(viz.plot_plan(tmp_path / "plan.png", resnet18_points, title="resnet18"))
    with pytest.raises(ValueError, match="at least one insertion point"):
        viz.plot_plan(tmp_path / "empty.png", [])


# ----------------------------------------------------------------------------------------------------------
# optional dependencies


def test_missing_matplotlib_is_a_clear_import_error(tmp_path, monkeypatch, resnet18_points):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    for call in (lambda: viz.plot_plan(tmp_path / "p.png", resnet18_points),
                 lambda: viz.plot_masks(tmp_path / "m.png")):
        with pytest.raises(ImportError, match=r'pip install "dropblock_inject\[viz\]"'):
            call()
    assert not list(tmp_path.iterdir())
    # the helpers that compute the numbers need no matplotlib
    assert viz.plan_counts(resnet18_points)[0].stage == "layer3"


def test_missing_scikit_image_is_a_clear_import_error_unless_an_image_is_given(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match=r"scikit-image.*pip install \"dropblock_inject\[viz\]\".*image="):
        viz.plot_masks(tmp_path / "m.png")
    read_png(viz.plot_masks(tmp_path / "m.png", image=np.ones((120, 120, 3)), block_sizes=(3,), keep_probs=(0.5,)))


# ----------------------------------------------------------------------------------------------------------
# the viz subcommand


def test_cli_viz_writes_three_pngs(tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main(["viz", "--out", str(out), "--model", "torchvision:resnet18", "--steps", "500"]) == 0
    printed = capsys.readouterr().out.split()
    names = ["plan.png", "schedule.png", "masks.png"]
    assert printed == [str(out / n) for n in names]
    for name in names:
        read_png(out / name)


def test_cli_viz_with_a_stride_recipe_and_an_input(tmp_path, capsys):
    args = ["viz", "--out", str(tmp_path), "--model", "torchvision:resnet18", "--recipe", "paper_generic",
            "--input", "1x3x64x64", "--steps", "10"]
    assert main(args) == 0
    assert len(capsys.readouterr().out.split()) == 3


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["--draws", "0"], "argument --draws: must be a positive integer, got '0'"),
    (["--model", "resnet18"], "must look like"),
])
def test_cli_viz_errors_are_one_line(tmp_path, capsys, argv, message):
    try:
        status = main(["viz", "--out", str(tmp_path / "o"), *argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_viz_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["viz", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "dropblock_inject[viz]"' in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_viz_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    assert main(["viz", "--out", str(target), "--model", "torchvision:resnet18"]) == 2
    err = capsys.readouterr().err
    assert "File exists" in err and err.count("\n") == 1
