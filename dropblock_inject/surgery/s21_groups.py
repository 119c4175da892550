"""Groups: the stride a layer counts in under a stride rule, from the recorded dataflow.

A layer counts at the stride of the map it computes, except a step of a residual branch, which counts in its
block's group (torchvision's ``layer3.0.conv1`` runs at stride 8 but belongs to the stride-16 stage), and
only backbone maps count at all (:class:`~.s16_roles.Roles`). Used by :mod:`.s22_select`.
"""

from __future__ import annotations

from torch import nn

from ..recipe import Rule
from .s07_kinds import inside_layer, module_kind, owner
from .s12_shapes import ShapeLog
from .s16_roles import Roles


def left_out(model: nn.Module, modules: dict[str, nn.Module], path: str, rule: Rule, roles: Roles | None) -> str:
    """The backbone layers at ``rule``'s strides that the module at ``path`` calls itself, named for a warning
    (empty without the dataflow)."""
    if roles is None or rule.stride is None:
        return ""
    kinds = {p: module_kind(m) for p, m in modules.items() if p}
    found = [p for p, k in kinds.items() if k is not None and not inside_layer(p, kinds) and owner(p, model) == path
             and roles.ran(p) and roles.is_backbone(p) and roles.stride(p) in rule.stride]
    return f" (its layers at that stride: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''})" if found else ""


def block_group(roles: Roles, modules: dict[str, nn.Module], path: str) -> int | None:
    """The stride of the residual block whose branch the module at ``path`` is a step of, when that module is
    the branch itself (pytorchcv's ``ResUnit.body``) or a conv-norm(-act) unit whose norm is one by behaviour
    (Hugging Face ResNet's ``ResNetConvLayer`` with DETR's frozen BatchNorm): its layers count in that block's
    group, as torchvision's ``layer3.0.conv1`` does at stride 8; None for any other module (a block of its
    own inside a block, as Selective Kernel's or ResNeSt's split attention, keeps its own stride)."""
    if not path or not roles.ran(path):
        return None
    outs = set(roles.flow.calls_of(path)[0].outputs)
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        block = ".".join(parts[:i])
        adds = [a for a in roles.adds_in(block) if a.skip is not None]
        if not adds:
            continue
        branch = any(a.operands[1 - a.skip] in outs for a in adds)  # type: ignore[operator]
        return roles.stride(block) if branch or norm_unit(roles, modules, path) else None
    return None


def norm_unit(roles: Roles, modules: dict[str, nn.Module], path: str) -> bool:
    """Whether the module at ``path`` is one conv, then a norm by behaviour (:attr:`.s16_roles.Roles.norms`) on the
    conv's output, and otherwise only activations, Identity or Dropout (a pre-activation ``bn-act-conv`` is
    not)."""
    kids = dict(modules[path].named_children())
    convs = [n for n, c in kids.items() if module_kind(c) == "conv"]
    norms = [n for n in kids if roles.is_norm(f"{path}.{n}")]
    rest = [c for n, c in kids.items() if n not in convs and n not in norms]
    if len(convs) != 1 or len(norms) != 1 or any(
            module_kind(c) != "act" and not isinstance(c, (nn.Identity, nn.Dropout)) for c in rest):
        return False
    conv, norm = roles.flow.calls_of(f"{path}.{convs[0]}"), roles.flow.calls_of(f"{path}.{norms[0]}")
    return bool(conv and norm and norm[0].inputs[:1] == conv[0].outputs[:1])


def in_backbone(roles: Roles, shapes: ShapeLog | None, path: str) -> bool:
    """Whether the module at ``path`` computes backbone maps; one of 1x1 maps (an input too small for the
    deepest stages) counts unless it runs after the backbone's deepest map, so that the plan can say why."""
    return roles.is_backbone(path) or (roles.is_one_cell(path) and shapes is not None and path not in shapes.heads)
