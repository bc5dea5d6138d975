"""Fused low-rank layout: the B factors of linears that read one input, stacked into one matmul.

q/k/v read the same hidden states, and so do gate/up. Separate LowRankLinear modules run one
B matmul per linear (three for q/k/v); the fused layout stores one B of (r_q + r_k + r_v) x n per
group and runs it once, then each member applies its own A to its slice of the result:

    h = B_group x            # one matmul for the group
    q = A_q h[:, 0:r_q]      # members keep their own A (and bias)
    k = A_k h[:, r_q:r_q+r_k] ...

The architecture's attention / MLP code is not touched: it still calls q_proj(x), k_proj(x),
v_proj(x). The first member computes B_group x; the others reuse it when they are called with the
very same tensor, and recompute otherwise, so a member used on its own is still correct.

State-dict keys: `<parent>.fused_<a>_<b>...B.weight` (the stacked B, e.g.
`model.layers.0.self_attn.fused_q_k_v.B.weight`) and `<member>.A.weight` / `<member>.A.bias`.
Values are exact: a fused model's outputs match the separate layout's up to float summation order.

This file imports only torch (and `.lowrank`): ressvd embeds it in the self-contained modeling
file of each checkpoint (see ressvd.checkpoint.remote_code).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .lowrank import LowRankLinear

LAYOUTS = ("separate", "fused")


class FusedLowRankGroup(nn.Module):
    """The stacked B factor of one group of linears that share an input."""

    def __init__(self, in_features: int, ranks: Sequence[int], dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if len(ranks) < 2 or any(r < 1 for r in ranks):
            raise ValueError(f"a fused group needs two or more ranks >= 1, got {list(ranks)}")
        self.in_features, self.ranks = in_features, tuple(int(r) for r in ranks)
        self.B = nn.Linear(in_features, sum(self.ranks), bias=False, dtype=dtype, device=device)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._version: int | None = None
        self._pending = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """B x, computed once for the members that read the same tensor in a row."""
        # the version counter catches an in-place change of x between members (inference tensors
        # and traced graphs have none)
        version = None if torch.compiler.is_compiling() or x.is_inference() else x._version
        if self._pending and self._input is x and self._version == version:
            h = self._output
            self._pending -= 1
        else:
            h = self.B(x)
            self._pending = len(self.ranks) - 1
            self._version = version
        if self._pending:
            self._input, self._output = x, h
        else:  # every member has had it: hold no activations between forwards
            self._input = self._output = None
        return h

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, ranks={list(self.ranks)}"


class FusedLowRankMember(nn.Module):
    """One linear of a fused group: its own A applied to its slice of the group's B x."""

    def __init__(self, group: FusedLowRankGroup, index: int, A: nn.Linear):
        super().__init__()
        rank = group.ranks[index]
        if A.in_features != rank:
            raise ValueError(f"A has {A.in_features} inputs, the group gives member {index} rank {rank}")
        self.in_features, self.out_features, self.rank = group.in_features, A.out_features, rank
        self.offset = sum(group.ranks[:index])
        self.A = A
        # A plain reference, not a submodule: the group's B is stored once, under its parent.
        object.__setattr__(self, "group", group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.group.project(x).narrow(-1, self.offset, self.rank))

    @property
    def B_weight(self) -> torch.Tensor:
        return self.group.B.weight.narrow(0, self.offset, self.rank)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product A·B (for inspection and tests; forward never forms it)."""
        return self.A.weight @ self.B_weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"offset={self.offset}")


def group_module_name(names: Sequence[str]) -> tuple[str, str]:
    """['m.l.0.self_attn.q_proj', ...k_proj, ...v_proj] -> ('m.l.0.self_attn', 'fused_q_k_v')."""
    parents = {name.rpartition(".")[0] for name in names}
    if len(parents) != 1:
        raise ValueError(f"a fused group's linears must share a parent module, got {list(names)}")
    children = [name.rpartition(".")[2] for name in names]
    return parents.pop(), "fused_" + "_".join(c[:-5] if c.endswith("_proj") else c for c in children)


def validate_layout(record: dict, ranks: dict, error: type[Exception] = ValueError) -> list[list[str]]:
    """The fused groups a `ressvd` record asks for ([] for the separate layout); raise `error` if
    the layout entry is malformed."""
    layout = record.get("layout", "separate")
    if layout not in LAYOUTS:
        raise error(f"unknown layout {layout!r} in the ressvd record; this ressvd knows {', '.join(LAYOUTS)}")
    groups = record.get("fused_groups", [])
    if layout == "separate":
        if groups:
            raise error("the ressvd record lists fused_groups but its layout is 'separate'")
        return []
    if not isinstance(groups, list) or not groups:
        raise error("the ressvd record has layout 'fused' but no fused_groups list")
    seen: set[str] = set()
    for names in groups:
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise error(f"fused group {names!r} is not a list of two or more module names")
        for name in names:
            if name not in ranks:
                raise error(f"fused group member {name!r} has no rank in the ressvd record")
            if name in seen:
                raise error(f"{name!r} is in more than one fused group")
            seen.add(name)
        try:
            group_module_name(names)
        except ValueError as err:
            raise error(str(err)) from err
    return [list(names) for names in groups]


def fuse_group(model: nn.Module, names: Sequence[str]) -> FusedLowRankGroup:
    """Replace the LowRankLinear modules `names` (siblings that read one input) by a fused group."""
    members = [model.get_submodule(name) for name in names]
    for name, module in zip(names, members):
        if not isinstance(module, LowRankLinear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a LowRankLinear: it cannot be fused")
    if len({m.in_features for m in members}) != 1:
        raise ValueError(f"{list(names)} read inputs of different widths; they cannot share a B")
    parent_name, group_name = group_module_name(names)
    parent = model.get_submodule(parent_name) if parent_name else model
    if hasattr(parent, group_name):
        raise ValueError(f"{parent_name or 'the model'} already has an attribute {group_name!r}")
    B = members[0].B.weight
    group = FusedLowRankGroup(members[0].in_features, [m.rank for m in members], dtype=B.dtype, device=B.device)
    with torch.no_grad():
        group.B.weight.copy_(torch.cat([m.B.weight for m in members]))
    setattr(parent, group_name, group)
    for index, (name, module) in enumerate(zip(names, members)):
        setattr(parent, name.rpartition(".")[2], FusedLowRankMember(group, index, module.A))
    return group


def unfuse_group(model: nn.Module, parent_name: str, group_name: str) -> list[str]:
    """Split a fused group back into separate LowRankLinear modules; return their names."""
    parent = model.get_submodule(parent_name) if parent_name else model
    group = getattr(parent, group_name)
    names = []
    for child, module in list(parent.named_children()):
        if isinstance(module, FusedLowRankMember) and module.group is group:
            linear = LowRankLinear(module.in_features, module.out_features, module.rank,
                                   bias=module.A.bias is not None, dtype=module.A.weight.dtype,
                                   device=module.A.weight.device)
            linear.A = module.A
            with torch.no_grad():
                linear.B.weight.copy_(module.B_weight)
            setattr(parent, child, linear)
            names.append(f"{parent_name}.{child}" if parent_name else child)
    delattr(parent, group_name)
    return names


def _set_layout(model: nn.Module, groups: list[list[str]]) -> None:
    record = getattr(model.config, "ressvd", None)
    if record is None:
        return
    record = dict(record)
    record.pop("fused_groups", None)
    record["layout"] = "fused" if groups else "separate"
    if groups:
        record["fused_groups"] = groups
    model.config.ressvd = record


def fuse_lowrank(model: nn.Module, groups: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Fuse a compressed model in place; return the groups fused.

    groups: lists of sibling LowRankLinear names; by default every input group of the
    architecture adapter (q/k/v, gate/up) of which two or more members are factorised (a member
    that stayed dense keeps its own nn.Linear). The model's `config.ressvd` record is updated, so
    ressvd.save writes the fused layout and both loaders rebuild it.
    """
    if any(isinstance(m, FusedLowRankGroup) for m in model.modules()):
        raise ValueError("the model is already fused")
    if groups is None:
        from ..models.registry import adapter_for  # ressvd only; never runs inside a checkpoint's code
        adapter = adapter_for(model.config)
        groups = []
        for index, layer in enumerate(adapter.layers(model)):
            for input_group in adapter.input_groups:
                names = [n for n in input_group if isinstance(layer.get_submodule(n), LowRankLinear)]
                if len(names) >= 2:
                    groups.append([f"{adapter.layers_path}.{index}.{n}" for n in names])
    groups = [list(names) for names in groups]
    for names in groups:
        fuse_group(model, names)
    _set_layout(model, groups)
    return groups


def unfuse_lowrank(model: nn.Module) -> None:
    """Back to separate LowRankLinear modules (the layout `ressvd.compress` produces)."""
    fused = [name for name, m in model.named_modules() if isinstance(m, FusedLowRankGroup)]
    for name in fused:
        parent_name, _, group_name = name.rpartition(".")
        unfuse_group(model, parent_name, group_name)
    _set_layout(model, [])
