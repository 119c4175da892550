"""Placement on torchvision detectors (issue 15): strides from the network's own maps, the paper's points in
the backbone body only (never on the FPN, its extra levels or the heads), a cheap example forward."""

import warnings

import pytest
import torch
from _models import counts
import torchvision
from torchvision.models import detection

import dropblock_inject as dbi
from dropblock_inject.surgery.s12_shapes import ShapeLog

SMALL = dict(weights=None, weights_backbone=None, min_size=320, max_size=480)
RESNET_FPN = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
              "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
              "fcos_resnet50_fpn"]
INPUTS = {"images": lambda: [torch.rand(3, 300, 400), torch.rand(3, 280, 360)],
          "tensor": lambda: torch.rand(1, 3, 224, 224)}


@pytest.mark.parametrize("name", RESNET_FPN)
@pytest.mark.parametrize("inp", list(INPUTS))
def test_paper_generic_in_the_resnet_body(name, inp):
    """27 branch + 9 shortcut points, all in backbone.body.layer3/layer4, whatever the input (the detector
    resizes it internally), with a list of images or a plain tensor."""
    model = getattr(detection, name)(**SMALL).eval()
    points = dbi.plan(model, "paper_generic", example_input=INPUTS[inp]())
    assert counts(points) == (27, 9)
    assert {p.module.rsplit(".", 1)[0] for p in points} == {"backbone.body.layer3", "backbone.body.layer4"}


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_mobilenet_fpn_detectors_only_in_the_body(name):
    """This FPN takes two maps of the same size (both stride 32): still a neck, never selected."""
    model = getattr(detection, name)(**SMALL).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular no "cannot trace module 'backbone.fpn'"
        points = dbi.plan(model, "paper_generic", example_input=INPUTS["images"]())
    assert points and all(p.module.startswith("backbone.body") for p in points)
    assert all(p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1 for p in points)


def test_ssdlite_points_in_its_mobilenet_features():
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    points = dbi.plan(model, "paper_generic", example_input=INPUTS["images"]())
    assert points and not any("head" in p.module for p in points)
    assert sum(p.after.startswith("features") or ".features." in p.module for p in points) >= len(points) - 1


def test_detector_shape_pass_runs_on_the_meta_device():
    """No real forward at the detector's internal resolution: the pass runs on meta tensors and stops in the
    post-processing (after the neck and heads have run); inject then trains and evaluates unchanged."""
    model = detection.retinanet_resnet50_fpn(**SMALL).eval()
    images = INPUTS["images"]()
    log = ShapeLog(model, images)
    assert log.how == "meta" and log.partial
    assert log.reference == (320, 448)  # the resized, padded batch the first convolution sees
    assert "backbone.fpn" in log.heads and "head" in log.heads
    with torch.no_grad():
        ref = model(images)
    dbi.inject(model, "paper_generic", example_input=images)
    with torch.no_grad():
        out = model(images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(out, ref))
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 100.0, 120.0]]), "labels": torch.tensor([1])}] * 2
    sum(model(images, targets).values()).backward()
    dbi.strip(model)


@pytest.mark.parametrize("recipe, name", [("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn"),
                                          ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"),
                                          ("fcos_resnet50_fpn", "fcos_resnet50_fpn"),
                                          ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")])
def test_named_detector_recipes(recipe, name):
    model = getattr(detection, name)(**SMALL).eval()
    points = dbi.plan(model, recipe)
    assert counts(points) == (27, 9)
    assert {round(p.keep_prob, 6) for p in points if ".layer4." in p.module} == {0.9}
    assert {round(p.keep_prob, 6) for p in points if ".layer3." in p.module} == {0.975}
    dbi.inject(model, recipe)
    assert len(dbi.injected_dropblocks(model)) == 36
    dbi.strip(model)
    assert not dbi.injected_dropblocks(model)


@pytest.mark.parametrize("name, allowed", [
    ("ssdlite320_mobilenet_v3_large", ()),
    ("ssd300_vgg16", ("extra_0_",)),  # VGG's conv5/fc6/fc7 are the body; extra[1] is SSD's first extra level
])
def test_ssd_extra_levels_get_no_point(name, allowed):
    """Levels an SSD backbone computes from its returned stride-32 level are extra levels, not the body."""
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    points = dbi.plan(model, "paper_generic", example_input=[torch.rand(3, 320, 320)])
    extra = [p.after for p in points if p.after.startswith("extra_")]
    assert all(a.startswith(allowed) for a in extra) if allowed else not extra, extra
    assert not allowed or extra, "the body in extra[0] lost its points"
    assert points and all(p.module.startswith("backbone") for p in points)
