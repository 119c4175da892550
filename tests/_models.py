"""The models the tests share, and the helpers that compare them.

Small residual CNNs (CPU-sized, with branches and shortcuts for DropBlock) and modules that each exercise one
way real code is written: residual additions of every style, optional or ``List[Tensor]`` arguments,
data-dependent control flow, conv-norm units.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dropblock_inject as dbi


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus the shortcut, then ReLU (torchvision's BasicBlock).

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution and of the projection.
        project: always use a 1x1 conv-BN projection shortcut; by default only when the shape changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, *, project: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if project or stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class SmallResNet(nn.Sequential):
    """A stem, named stages of :class:`BasicBlock`, global average pooling and a linear head.

    A ``Sequential`` (so TorchScript compiles it) whose children are ``stem``, the stages, ``pool``,
    ``flatten`` and ``fc``.

    Args:
        stages: ``(name, strides)`` per stage, one block per stride; a stride-2 block doubles the width.
        width: channels of the stem.
        num_classes: outputs of the head.
        stem_stride: stride of the stem convolution.
        stem_norm: conv-BN-ReLU stem; ``False`` gives a biased conv and ReLU.
        project: every block gets a projection shortcut (see :class:`BasicBlock`).
    """

    def __init__(self, stages: Sequence[tuple[str, Sequence[int]]] = (("layer3", (2, 1)), ("layer4", (2, 1))),
                 width: int = 8, num_classes: int = 10, *, stem_stride: int = 1, stem_norm: bool = True,
                 project: bool = False) -> None:
        layers: dict[str, nn.Module] = {}
        if stem_norm:
            layers["stem"] = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False),
                                           nn.BatchNorm2d(width), nn.ReLU())
        else:
            layers["stem"] = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1), nn.ReLU())
        channels = width
        for name, strides in stages:
            blocks = []
            for stride in strides:
                cout = channels * stride
                blocks.append(BasicBlock(channels, cout, stride, project=project))
                channels = cout
            layers[name] = nn.Sequential(*blocks)
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(channels, num_classes)
        super().__init__(OrderedDict(layers))


# ------------------------------------------------------------------------------------------------ helpers

X = torch.randn(2, 3, 64, 64)  # the input most surgery tests feed


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, state):
    sd = model.state_dict()
    return list(sd) == list(state) and all(torch.equal(sd[k], state[k]) for k in state)


def counts(points):
    branch = sum(p.kind == "branch" for p in points)
    return branch, len(points) - branch


def set_keep(model, value):
    for m in dbi.injected_dropblocks(model):
        m.keep_prob = value


def dropblock_nodes(gm: torch.fx.GraphModule) -> int:
    """The DropBlock calls of an fx graph: nodes of the registered op, or DropBlock modules kept as leaves."""
    def is_dropblock(n):
        if n.op == "call_module":
            return isinstance(gm.get_submodule(str(n.target)), dbi.ops._modules._DropBlockNd)
        return n.op == "call_function" and "drop_block" in str(n.target)

    return sum(map(is_dropblock, gm.graph.nodes))


def reload(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------------------------------- one pattern each

class BlockWithTrainingFlag(nn.Module):
    """A residual block whose own forward reads self.training (fx would bake it in)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.dropout(y, 0.5, self.training)
        return x + y


class AddStyleBlock(nn.Module):
    def __init__(self, style, c=8, project=False):
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.proj = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) if project else None

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = self.proj(x) if self.proj is not None else x
        if self.style == "add":
            out = y + s
        elif self.style == "radd":
            out = s + y
        elif self.style == "iadd":
            y += s
            out = y
        elif self.style == "torch.add":
            out = torch.add(s, y)
        elif self.style == "method":
            out = y.add(s)
        else:  # add_
            out = y.add_(s)
        return F.relu(out)


class AddStyleNet(nn.Module):
    def __init__(self, style, project):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = AddStyleBlock(style, project=project)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow: the whole model is not traceable
            x = x * 1.0
        return self.head(x.mean((2, 3)))


class OptionalShortcutBlock(nn.Module):
    """Like timm's DlaBasic: an optional shortcut argument, the identity when it is None."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x, shortcut=None, children=None):
        if shortcut is None:
            shortcut = x
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += shortcut
        return F.relu(out)


class OptionalNet(nn.Module):
    def __init__(self, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.b1 = OptionalShortcutBlock()
        self.b2 = OptionalShortcutBlock()

    def forward(self, x):
        x = self.stem(x)
        x = self.b1(x, self.project(x))
        return self.b2(x).mean((2, 3))


OPTIONAL_RECIPE = {"rules": [{"modules": ["b1", "b2"], "after": ["norm"], "shortcut": True}]}


class ListBlock(nn.Module):
    """Like timm's SelecSlsBlock / HRNet's HighResolutionModule: List[Tensor] in and out, item assignment."""

    def __init__(self, c=8):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
                                      for _ in range(2))

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if not isinstance(x, list):
            x = [x]
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return [x[0] + x[1], x[1]]


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ListBlock(), ListBlock())

    def forward(self, x):
        x = self.stem(x)
        a, b = self.blocks([x, x * 2])
        return (a + b).mean((2, 3))


class UntraceableBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow
            y = y * 1.0
        return x + y


class StrideNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 16, stride=16)  # stride 16 at once
        self.res = AddStyleBlock("add")
        self.odd = UntraceableBlock()

    def forward(self, x):
        return self.odd(self.res(self.stem(x))).mean((2, 3))


class ConvBnResidual(nn.Module):
    """The children of a conv-norm unit, but a residual block."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu(self.bn(self.conv(x)))


class BnConv(ConvBnResidual):
    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))  # pre-activation: normalises before convolving


class ConvBnNamed(ConvBnResidual):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


# ---- issue 15: placement on models nobody here wrote ------------------------------------------------------


class FunctionalConvBlock(nn.Module):
    """A residual block whose convolutions are ``F.conv2d`` on its own Parameters, each followed by a BN."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.bn1 = nn.BatchNorm2d(c)
        self.w2 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(F.conv2d(x, self.w1, padding=1)))
        return F.relu(x + self.bn2(F.conv2d(out, self.w2, padding=1)))


class ConvBlock(nn.Module):
    """conv-BN-ReLU twice, no residual: what a residual wrapper wraps."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Residual(nn.Module):
    """``x + self.fn(x)`` around any module (ConvMixer-, EfficientViT-style)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


class WrappedNet(nn.Module):
    """A stride-16 stem, two residual wrappers around conv blocks, global pooling."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 16, stride=16)
        self.blocks = nn.Sequential(Residual(ConvBlock(c)), Residual(ConvBlock(c)))
        self.head = nn.Linear(c, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SegNet(nn.Module):
    """A tiny segmenter: a stride-16 body, a pyramid-pooling branch (3x3 adaptive pool, conv, BN), a 1-channel
    spatial attention map, and a 1x1 classifier conv whose logits are upsampled to the input (a prediction)."""

    def __init__(self, c: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 16, stride=16)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.pool_conv, self.pool_bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.attn = nn.Conv2d(c, 1, 3, padding=1)
        self.classifier = nn.Conv2d(2 * c, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        f = self.body(self.stem(x))
        p = self.pool_bn(self.pool_conv(self.pool(f)))
        f = f * self.attn(f)
        p = F.interpolate(p, size=f.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(torch.cat([f, p], 1))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class CachingNet(SmallResNet):
    """A SmallResNet whose forward keeps its last input's shape as an attribute (a cache)."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        self.last_shape = tuple(x.shape)
        return super().forward(x)


def hook_state(model: nn.Module) -> dict:
    """Every module's forward hooks and attributes, and the global forward hooks: what a failed or successful
    plan must leave exactly as it was."""
    from torch.nn.modules import module as m

    per_module = {name: (len(mod._forward_hooks), len(mod._forward_pre_hooks), sorted(mod.__dict__),
                         sorted(mod._buffers), sorted(mod._parameters))
                  for name, mod in model.named_modules() if not isinstance(mod, torch.jit.ScriptModule)}
    return {"modules": per_module, "global": (len(m._global_forward_hooks), len(m._global_forward_pre_hooks))}


# ------------------------------------------------------------------------------- the rest of the training stack

import dataclasses  # noqa: E402 - this section's own imports (the file is appended to by several branches)
from typing import NamedTuple  # noqa: E402

class Pair(NamedTuple):
    features: Tensor
    pooled: Tensor


@dataclasses.dataclass
class PairData:
    features: Tensor
    pooled: Tensor | None = None


class PairDict(OrderedDict):
    """An OrderedDict subclass that torch's pytree does not know (Hugging Face's ModelOutput is one it does)."""


OUTPUT_TYPES = {
    "namedtuple": lambda f, p: Pair(f, p),
    "dataclass": lambda f, p: PairData(f, p),
    "ordereddict_subclass": lambda f, p: PairDict(features=f, pooled=p),
    "dict": lambda f, p: {"features": f, "pooled": p},
    "tuple": lambda f, p: (f, (p, None)),
    "list": lambda f, p: [f, [p]],
}


class StructuredBlock(nn.Module):
    """A conv-BN residual block returning its features and their mean in one of :data:`OUTPUT_TYPES`."""

    def __init__(self, kind: str, c: int = 8) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: Tensor):
        y = x + self.bn(self.conv(x))
        return OUTPUT_TYPES[self.kind](y, y.mean((2, 3)))


class ConvStemTransformer(nn.Module):
    """Not a CNN: a conv stem to stride 32, a transformer on its tokens, then a residual conv decoder at stride 16
    (a conv stem and a conv decoder around attention: timm LeViT, MONAI UNETR)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 4, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 8, 1))
        self.encoder = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
        self.up = nn.ConvTranspose2d(32, 16, 2, 2)
        self.dec = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.shape
        t = self.encoder(y.flatten(2).transpose(1, 2))
        z = self.up(t.transpose(1, 2).reshape(n, c, h, w))
        return z + self.dec(z)
