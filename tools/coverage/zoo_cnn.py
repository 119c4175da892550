"""CNN zoos beyond torchvision and timm, built offline with random weights: pytorchcv's ImageNet families,
MONAI's 2-D networks, and efficientnet_pytorch; each entry is ``(name, family, ctor, size)``."""

from __future__ import annotations

from typing import Callable

from torch import nn

Entry = tuple[str, str, Callable[[], nn.Module], int]

# the smallest ImageNet variant of each family (pytorchcv's final 7x7 average pool wants a 224 px input)
PYTORCHCV = [
    "resnet10", "preresnet10", "seresnet10", "resnext14_16x4d", "densenet121", "dla34", "dpn68", "darknet_tiny",
    "darknet53", "mobilenet_wd4", "mobilenetv2_wd4", "mobilenetv3_small_w7d20", "mnasnet_small", "efficientnet_b0",
    "ghostnet", "regnetx002", "hrnet_w18_small_v1", "bam_resnet18", "cbam_resnet18", "sknet50", "resnestabc14",
    "shufflenetv2_wd2", "vovnet27s", "selecsls42b", "diaresnet10", "peleenet", "proxylessnas_mobile",
]
PYTORCHCV_FAST = ["resnet10", "mobilenetv2_wd4"]


def _pytorchcv_family(name: str) -> str:
    from pytorchcv.model_provider import _models

    return _models[name].__module__.rsplit(".", 1)[-1]


def pytorchcv_models(fast: bool = False) -> list[Entry]:
    """pytorchcv classifiers via ``get_model(name, pretrained=False)``."""
    from pytorchcv.model_provider import get_model

    names = PYTORCHCV_FAST if fast else PYTORCHCV
    return [(n, _pytorchcv_family(n), (lambda n=n: get_model(n, pretrained=False)), 224) for n in names]


def _monai_zoo() -> dict[str, tuple[str, Callable[[], nn.Module], int]]:
    from monai import networks as M
    from monai.networks import nets

    seg = dict(spatial_dims=2, in_channels=3, out_channels=2)
    return {
        "BasicUNet": ("basic_unet", lambda: nets.BasicUNet(**seg, features=(8, 8, 16, 32, 64, 8)), 64),
        "UNet (residual units)": ("unet", lambda: nets.UNet(**seg, channels=(8, 16, 32, 64, 128),
                                                             strides=(2, 2, 2, 2), num_res_units=2), 64),
        "AttentionUnet": ("attentionunet", lambda: nets.AttentionUnet(**seg, channels=(8, 16, 32, 64, 128),
                                                                      strides=(2, 2, 2, 2)), 64),
        "SegResNet": ("segresnet", lambda: nets.SegResNet(**seg, init_filters=8), 64),
        "DynUNet": ("dynunet", lambda: nets.DynUNet(**seg, kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, 2],
                                                    upsample_kernel_size=[2] * 5, filters=[8, 16, 32, 64, 128, 128],
                                                    res_block=True), 64),
        # VNet's first conv wants in_channels dividing 16: a 1x1 conv maps RGB to one channel first
        "VNet (1-channel, after a 1x1 conv)": ("vnet", lambda: nn.Sequential(nn.Conv2d(3, 1, 1), nets.VNet(
            spatial_dims=2, in_channels=1, out_channels=2, dropout_prob_down=0.0, dropout_prob_up=(0.0, 0.0))), 64),
        "DenseNet121": ("densenet", lambda: nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=4), 64),
        "ResNet18 (2-D)": ("resnet", lambda: nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=4), 64),
        "SEResNet50": ("senet", lambda: nets.SEResNet50(spatial_dims=2, in_channels=3, num_classes=4), 64),
        "EfficientNetBN(b0)": ("efficientnet", lambda: nets.EfficientNetBN("efficientnet-b0", pretrained=False,
                                                                            spatial_dims=2, in_channels=3,
                                                                            num_classes=4), 64),
        "FlexibleUNet(efficientnet-b0)": ("flexible_unet", lambda: nets.FlexibleUNet(
            3, 2, "efficientnet-b0", pretrained=False, spatial_dims=2), 64),
        "HighResNet": ("highresnet", lambda: M.nets.HighResNet(spatial_dims=2, in_channels=3, out_channels=2), 64),
    }


MONAI_FAST = ["ResNet18 (2-D)"]


def monai_models(fast: bool = False) -> list[Entry]:
    """MONAI networks, 2-D (``spatial_dims=2``) to keep the sweep fast; small widths where they are arguments."""
    zoo = _monai_zoo()
    names = MONAI_FAST if fast else list(zoo)
    return [(n, zoo[n][0], zoo[n][1], zoo[n][2]) for n in names]


def efficientnet_pytorch_models(fast: bool = False) -> list[Entry]:
    """lukemelas' efficientnet_pytorch: ``EfficientNet.from_name`` (random weights)."""
    from efficientnet_pytorch import EfficientNet

    names = ["efficientnet-b0"] if fast else ["efficientnet-b0", "efficientnet-b1"]
    return [(n, "efficientnet", (lambda n=n: EfficientNet.from_name(n)), 64) for n in names]
