"""Detectors and segmenters of Ultralytics and Hugging Face transformers, built offline with random weights.

Ultralytics networks come from their YAMLs (``YOLO("yolov8n.yaml").model``: the ``nn.Module`` a user passes,
not the ``YOLO`` object) with ``YOLO_OFFLINE`` set while it is imported and builds; the Hugging Face DETR
family and Mask2Former/MaskFormer from configs with a small ResNet backbone. The tests build their models
with these functions too, so each is written once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator

from torch import nn

Entry = tuple[str, str, Callable[[], nn.Module], int]

ULTRALYTICS = [
    "yolov3-tinyu", "yolov5nu", "yolov6n", "yolov8n", "yolov8n-seg", "yolov8n-pose", "yolov8n-obb", "yolov8n-cls",
    "yolov8n-ghost", "yolov9t", "yolov10n", "yolo11n", "yolo11n-seg", "yolo11n-pose", "yolo11n-cls", "yolo12n",
    "yolo12n-seg", "yolo26n", "rtdetr-l",
]
ULTRALYTICS_FAST = ["yolov8n"]


@contextlib.contextmanager
def ultralytics_offline(settings: str | None = None) -> Iterator[None]:
    """``YOLO_OFFLINE=1``, no automatic installs, and a settings directory (``settings``, else a temporary one
    unless one is set) while Ultralytics imports and builds; the variables are restored after (the sweep
    changes no environment variable of the process it runs in). Ultralytics reads them once, on import.

    Args:
        settings: the settings directory to use (it must outlive the process's use of Ultralytics).
    """
    names = ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "YOLO_AUTOINSTALL")
    saved = {k: os.environ.get(k) for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="false")
        if settings is not None:
            os.environ["YOLO_CONFIG_DIR"] = settings
        else:
            os.environ.setdefault("YOLO_CONFIG_DIR", tmp)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def ultralytics_model(name: str) -> nn.Module:
    """The network of ``YOLO("<name>.yaml")`` (``RTDETR`` for ``rtdetr-*``), random weights, no download.

    Args:
        name: a YAML name without ``.yaml`` (``yolov8n``, ``yolo11n-seg``, ``rtdetr-l``...).

    Returns:
        The ``nn.Module`` (``DetectionModel``, ``SegmentationModel``, ``PoseModel``...), in eval mode.
    """
    with ultralytics_offline(), contextlib.redirect_stdout(None):
        import ultralytics

        if name.startswith("rtdetr"):
            return ultralytics.RTDETR(f"{name}.yaml").model.eval()
        return ultralytics.YOLO(f"{name}.yaml", verbose=False).model.eval()


def ultralytics_models(fast: bool = False) -> list[Entry]:
    """Ultralytics YOLO (v3u to 26: detection, ``-seg``, ``-pose``, ``-obb``, ``-cls``) and RT-DETR networks."""
    names = ULTRALYTICS_FAST if fast else ULTRALYTICS
    family = lambda n: n.split("-")[0].rstrip("nsu") if not n.startswith("rtdetr") else "rtdetr"  # noqa: E731
    return [(n, family(n), (lambda n=n: ultralytics_model(n)), 128) for n in names]


# ---- Hugging Face transformers ------------------------------------------------------------------------------

def _small_resnet(out_features: list[str], rt_detr: bool = False) -> object:
    import transformers as T

    cls = T.RTDetrResNetConfig if rt_detr else T.ResNetConfig
    return cls(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=16, layer_type="bottleneck",
               out_features=out_features)


def _detr_kwargs() -> dict:
    return dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
                backbone_config=_small_resnet(["stage4"]), d_model=32, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, encoder_layers=1,
                decoder_layers=1)


def hf_detr(kind: str = "detr") -> nn.Module:
    """A small Hugging Face DETR-family detector: ``detr``, ``conditional_detr`` or ``table_transformer``
    (a 4-stage bottleneck ResNet, one encoder and one decoder layer, d_model 32).

    Args:
        kind: which model.

    Returns:
        The ``...ForObjectDetection`` model (random weights).
    """
    import transformers as T

    cfg, cls = {"detr": (T.DetrConfig, T.DetrForObjectDetection),
                "conditional_detr": (T.ConditionalDetrConfig, T.ConditionalDetrForObjectDetection),
                "table_transformer": (T.TableTransformerConfig, T.TableTransformerForObjectDetection)}[kind]
    return cls(cfg(**_detr_kwargs()))


def hf_rt_detr() -> nn.Module:
    """A small Hugging Face RT-DETR (RT-DETR ResNet backbone with three levels, one encoder/decoder layer)."""
    import transformers as T

    cfg = T.RTDetrConfig(backbone_config=T.RTDetrResNetConfig(depths=[1, 1, 1, 1],
                                                              out_features=["stage2", "stage3", "stage4"]),
                         use_pretrained_backbone=False, encoder_layers=1, decoder_layers=1, num_queries=20)
    return T.RTDetrForObjectDetection(cfg)


def hf_mask2former(maskformer: bool = False) -> nn.Module:
    """A small Hugging Face Mask2Former (or MaskFormer) for universal segmentation on a 4-level ResNet."""
    import transformers as T

    backbone = _small_resnet(["stage1", "stage2", "stage3", "stage4"])
    if maskformer:
        cfg = T.MaskFormerConfig(backbone_config=backbone, use_pretrained_backbone=False, fpn_feature_size=32,
                                 mask_feature_size=32, num_queries=5,
                                 decoder_config=T.DetrConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                             encoder_attention_heads=2, decoder_attention_heads=2,
                                                             encoder_ffn_dim=32, decoder_ffn_dim=32))
        return T.MaskFormerForInstanceSegmentation(cfg)
    cfg = T.Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, feature_size=32,
                              mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
                              encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=5)
    return T.Mask2FormerForUniversalSegmentation(cfg)


def hf_detection_models(fast: bool = False) -> list[Entry]:
    """The Hugging Face DETR family, RT-DETR, Mask2Former and MaskFormer (small configs)."""
    zoo: list[tuple[str, str, Callable[[], nn.Module]]] = [
        ("DetrForObjectDetection", "detr", lambda: hf_detr("detr")),
        ("ConditionalDetrForObjectDetection", "conditional_detr", lambda: hf_detr("conditional_detr")),
        ("TableTransformerForObjectDetection", "table_transformer", lambda: hf_detr("table_transformer")),
        ("RTDetrForObjectDetection", "rt_detr", hf_rt_detr),
        ("Mask2FormerForUniversalSegmentation", "mask2former", hf_mask2former),
        ("MaskFormerForInstanceSegmentation", "maskformer", lambda: hf_mask2former(maskformer=True)),
    ]
    return [(n, family, ctor, 128) for n, family, ctor in (zoo[:1] if fast else zoo)]
