"""Model walking: the quantizable units of a causal LM, found generically, and accessors to their weights.

No per-architecture tables. The decoder blocks are the largest `nn.ModuleList` of identical modules that hold
weight matrices. A **unit** is one 2-D weight matrix the pipeline quantizes, always seen as (out, in):
  * an `nn.Linear` (weight stored (out, in)); its unit name is the module's name;
  * a transposed linear such as transformers' `Conv1D` (GPT-2; weight stored (in, out), y = x W + b);
  * one expert of a fused 3-D parameter (E, out, in) — transformers 5 stores MoE experts that way
    (`mlp.experts.gate_up_proj`) — named `<parameter>.<expert>`, e.g. `model.layers.0.mlp.experts.down_proj.3`;
    each expert's matrix is its own unit, so per-row tables, groups, outliers and CSR residuals stay per output
    row of each expert.
A unit's name resolves back to its weight without a table (`unit_ref`). Every other parameter with ≥ 2
dimensions inside the blocks must be excluded, by default (embeddings, routers) or by the user (`--exclude`);
anything else is refused (`coverage`), so a model is never quantized half-way without a word.
Loading a model from a path is loading.py's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, InputError

# ----------------------------------------------------------------------------------------------------------
# Units and their weights


def is_transposed_linear(mod: nn.Module) -> bool:
    """A linear layer that stores its weight (in, out) and computes x W + b: transformers' `Conv1D` (GPT-2).

    Recognised by its declared output width `nf` matching the weight's second axis (Conv1D's own contract),
    so copies of the class in remote code are found too."""
    w = getattr(mod, "weight", None)
    nf = getattr(mod, "nf", None)
    return (
        not isinstance(mod, nn.Linear)
        and isinstance(w, nn.Parameter)
        and w.dim() == 2
        and isinstance(nf, int)
        and w.shape[1] == nf
    )


def experts_transposed(owner: nn.Module) -> bool:
    """Whether the fused 3-D expert parameters of `owner` are stored (E, in, out) rather than (E, out, in).

    transformers declares this on every experts class through `use_experts_implementation(is_transposed=...)`,
    and all of its experts implementations (eager, batched_mm, grouped_mm) read the weights by that flag; reading
    it is exact, where guessing from shapes is not (a square expert is ambiguous). Without the flag, (E, out, in)
    is the convention of the eager loop `F.linear(x, W[e])`; calibration checks it where it watches the calls."""
    return bool(getattr(owner, "is_transposed", False))


@dataclass(frozen=True)
class UnitRef:
    """Where a unit's weight lives: the parameter, the expert index along its axis 0 (None for a 2-D parameter)
    and whether the matrix is stored (in, out)."""

    param: nn.Parameter
    index: int | None = None
    transposed: bool = False

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The unit's (out, in) view of a tensor shaped like the parameter (the parameter itself, its grad)."""
        if self.index is not None:
            t = t[self.index]
        return t.T if self.transposed else t

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) view of the live parameter (writable under torch.no_grad)."""
        return self.of(self.param)


def unit_ref(model: nn.Module, name: str) -> UnitRef:
    """Resolve a unit name: a linear (or transposed linear) module, or `<3-D parameter>.<expert>`."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        mod = None
    if isinstance(mod, nn.Linear):
        return UnitRef(mod.weight)
    if mod is not None and is_transposed_linear(mod):
        return UnitRef(mod.weight, None, True)
    param_name, _, idx = name.rpartition(".")
    if idx.isdigit():
        owner_name, _, leaf = param_name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            owner = None
        p = owner._parameters.get(leaf) if owner is not None else None
        if p is not None and p.dim() == 3 and int(idx) < p.shape[0]:
            return UnitRef(p, int(idx), experts_transposed(owner))  # type: ignore[arg-type]
    raise ConfigError(f"{name!r} is not a quantizable unit of the model (a linear layer or an expert of a 3-D weight)")


def unit_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The unit's (out, in) view of its live weight parameter (writable under torch.no_grad)."""
    return unit_ref(model, name).weight


def unit_grad(model: nn.Module, name: str) -> torch.Tensor | None:
    """The unit's (out, in) view of its parameter's .grad (None when there is none)."""
    ref = unit_ref(model, name)
    return None if ref.param.grad is None else ref.of(ref.param.grad)


def unit_parameter_name(model: nn.Module, name: str) -> str:
    """The full name of the parameter holding the unit (`<module>.weight`, or the 3-D parameter's name)."""
    ref = unit_ref(model, name)
    return name.rpartition(".")[0] if ref.index is not None else f"{name}.weight"


# ----------------------------------------------------------------------------------------------------------
# Layer discovery


def _own_units(mod: nn.Module) -> bool:
    return (
        isinstance(mod, nn.Linear)
        or is_transposed_linear(mod)
        or any(p.dim() == 3 for p in mod._parameters.values() if p is not None)
    )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the largest ModuleList of same-type modules that contain quantizable units, not
    counting lists nested in another such list (a block's list of expert MLPs can be longer than the blocks)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(_own_units(m) for m in mod[0].modules()):
            continue
        found.append((name, mod))
    outer = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if not outer:
        raise InputError("the model has no decoder blocks with linear layers (nothing to quantize)")
    return max(outer, key=lambda nm: len(nm[1]))  # the first of the longest, in model order


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable unit: its name, block index, kind, shape as (out, in), and where its weight is stored."""

    name: str
    block: int | None
    kind: str  # the module's own name inside its parent ("q_proj"), or the fused parameter's ("gate_up_proj")
    out_features: int
    in_features: int
    expert: int | None = None  # index along axis 0 of a fused 3-D parameter
    transposed: bool = False  # stored (in, out): Conv1D, transposed expert layouts

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def parameter(self) -> str:
        """The full name of the parameter holding this unit's weight."""
        return self.name.rpartition(".")[0] if self.expert is not None else f"{self.name}.weight"


def _compile(patterns: Iterable[str] | None, what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def _module_units(name: str, mod: nn.Module, block: int | None) -> list[LayerInfo]:
    """The units a module holds itself (not its children)."""
    kind = name.rsplit(".", 1)[-1]
    if isinstance(mod, nn.Linear):
        return [LayerInfo(name, block, kind, mod.out_features, mod.in_features)]
    if is_transposed_linear(mod):
        w = mod.weight
        return [LayerInfo(name, block, kind, w.shape[1], w.shape[0], transposed=True)]  # type: ignore[index]
    out = []
    t = experts_transposed(mod)
    for leaf, p in mod._parameters.items():
        if p is None or p.dim() != 3:
            continue
        pname = f"{name}.{leaf}" if name else leaf
        o, i = (p.shape[2], p.shape[1]) if t else (p.shape[1], p.shape[2])
        out += [LayerInfo(f"{pname}.{e}", block, leaf, o, i, expert=e, transposed=t) for e in range(p.shape[0])]
    return out


def all_units(model: nn.Module) -> list[LayerInfo]:
    """Every unit of the model, in model order, selected or not (inside the blocks or not)."""
    prefix, _ = find_blocks(model)
    out = []
    for name, mod in model.named_modules():
        out += _module_units(name, mod, _block_index(name + ".", prefix))
    return out


def quantizable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[LayerInfo]:
    """The single source of truth for which units get quantized, in model order.

    Default: every unit inside the decoder blocks except routers (see `coverage`), and every other parameter
    with ≥ 2 dimensions there must be excluded by default or by `exclude`, else ConfigError names it.
    `include` regexes (re.search on the unit name) replace that default with all units they match anywhere
    (an explicit choice: nothing is refused); `exclude` regexes remove. The experts of one fused parameter are
    quantized together or not at all (they are stored as one module).
    """
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    tied = _tied_output(model)
    routers = _router_modules(model)
    layers = []
    for info in all_units(model):
        default = info.block is not None and info.name not in routers
        chosen = any(p.search(info.name) for p in inc) if inc else default
        if not chosen or any(p.search(info.name) for p in exc):
            continue
        if info.expert is None and tied is not None and model.get_submodule(info.name) is tied:
            raise ConfigError(
                f"layer {info.name!r} shares its weight with the input embeddings; it cannot be "
                "quantized on its own (exclude it)"
            )
        layers.append(info)
    if not layers:
        raise ConfigError("no quantizable layers selected (check --include/--exclude patterns)")
    _check_whole_experts(model, layers)
    if not inc:
        cov = coverage(model, layers, exclude)
        if cov.unhandled:
            name, shape = cov.unhandled[0]
            raise ConfigError(
                f"parameter {name} {tuple(shape)} inside the decoder blocks is neither quantized nor excluded "
                "(requant quantizes linear layers, transposed linears and fused 3-D experts); exclude it with "
                "--exclude to keep it in 16 bits"
            )
    return layers


def _check_whole_experts(model: nn.Module, layers: list[LayerInfo]) -> None:
    count: dict[str, int] = {}
    for i in layers:
        if i.expert is not None:
            count[i.parameter] = count.get(i.parameter, 0) + 1
    for pname, n in count.items():
        total = model.get_parameter(pname).shape[0]
        if n != total:
            raise ConfigError(
                f"{n} of the {total} experts of {pname} are selected; the experts of one fused parameter are "
                f"quantized together (select all of {pname}.* or none)"
            )


def _block_index(name: str, prefix: str) -> int | None:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _tied_output(model: nn.Module) -> nn.Module | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and out is not None and out.weight is emb.weight:
        return out
    return None


# ----------------------------------------------------------------------------------------------------------
# Coverage: what the blocks hold besides the quantized units


def _expert_counts(block: nn.Module) -> set[int]:
    return {p.shape[0] for p in block.parameters() if p.dim() == 3}


def _router_modules(model: nn.Module) -> set[str]:
    """Modules holding a router (gate) weight, kept in 16 bits by default: inside a block with fused experts,
    a 2-D weight with one row per expert (the routing logits) or a single row (a shared-expert gate).

    Found by shape, not by name: no LM projection has E (a handful of experts) or 1 output rows."""
    prefix, blocks = find_blocks(model)
    out = set()
    for b, block in enumerate(blocks):
        counts = _expert_counts(block)
        if not counts:
            continue
        for name, mod in block.named_modules():
            w = mod._parameters.get("weight")
            if w is not None and w.dim() == 2:
                rows = w.shape[1] if is_transposed_linear(mod) else w.shape[0]
                if rows in counts or rows == 1:
                    out.add(f"{prefix}.{b}.{name}")
    return out


@dataclass
class Coverage:
    """How much of the decoder blocks' weight matrices (≥ 2-D parameters) the selected units cover."""

    block_weights: int  # elements of every ≥ 2-D parameter inside the blocks
    quantized_weights: int  # elements of the selected units inside the blocks
    matrices: dict[int, tuple[int, int]]  # block → (quantized matrices, all matrices; an expert counts as one)
    excluded: list[str]  # ≥ 2-D parameters left in 16 bits by default (embeddings, routers) or by --exclude
    unhandled: list[tuple[str, tuple[int, ...]]]  # ≥ 2-D parameters neither quantized nor excluded

    @property
    def share(self) -> float:
        return self.quantized_weights / self.block_weights if self.block_weights else 0.0

    def summary(self) -> str:
        """E.g. "quantized 96.3% of block weights (12 of 12 matrices in each block)"."""
        per = set(self.matrices.values())
        if len(per) == 1:
            q, t = per.pop()
            where = f"{q} of {t} matrices in each block"
        else:
            q = sum(v[0] for v in self.matrices.values())
            t = sum(v[1] for v in self.matrices.values())
            where = f"{q} of {t} matrices over {len(self.matrices)} blocks"
        return f"quantized {100 * self.share:.1f}% of block weights ({where})"

    def to_dict(self) -> dict[str, object]:
        return {
            "block_weights": self.block_weights,
            "quantized_weights": self.quantized_weights,
            "share": self.share,
            "summary": self.summary(),
            "excluded": self.excluded,
        }


def coverage(model: nn.Module, units: Sequence[LayerInfo], exclude: Sequence[str] | None = None) -> Coverage:
    """The blocks' ≥ 2-D parameters against the selected units: quantized, excluded (embeddings and routers by
    default; those `exclude` matches by parameter, module or unit name) or unhandled."""
    prefix, blocks = find_blocks(model)
    exc = _compile(exclude, "exclude")
    routers = _router_modules(model)
    quantized_params: dict[str, int] = {}
    for i in units:
        quantized_params[i.parameter] = quantized_params.get(i.parameter, 0) + 1
    total = quant = 0
    matrices: dict[int, tuple[int, int]] = {}
    excluded: list[str] = []
    unhandled: list[tuple[str, tuple[int, ...]]] = []
    for b, block in enumerate(blocks):
        nq = nt = 0
        for mname, mod in block.named_modules():
            full_mod = f"{prefix}.{b}.{mname}" if mname else f"{prefix}.{b}"
            for leaf, p in mod._parameters.items():
                if p is None or p.dim() < 2:
                    continue
                pname = f"{full_mod}.{leaf}"
                n_mat = p.shape[0] if p.dim() == 3 else 1
                total += p.numel()
                nt += n_mat
                if pname in quantized_params:
                    quant += p.numel() * quantized_params[pname] // n_mat
                    nq += quantized_params[pname]
                    continue
                names = [pname, full_mod, *(f"{pname}.{e}" for e in range(n_mat) if p.dim() == 3)]
                if (
                    isinstance(mod, nn.Embedding)
                    or full_mod in routers
                    or any(pat.search(n) for pat in exc for n in names)
                ):
                    excluded.append(pname)
                else:
                    unhandled.append((pname, tuple(p.shape)))
        matrices[b] = (nq, nt)
    return Coverage(total, quant, matrices, excluded, unhandled)


# ----------------------------------------------------------------------------------------------------------
# Editing


def use_eager_experts(model: nn.Module) -> bool:
    """Run fused experts through transformers' eager loop (`F.linear(x, W[e])` per routed expert) when the model
    has any; returns whether it has. transformers 5 defaults to "grouped_mm", which reads the whole 3-D
    parameter at once: calibration could not see which tokens reach which expert, and a quantized expert
    module (format.qlinear.QuantExperts) serves its experts one index at a time."""
    if not any(p.dim() == 3 for p in model.parameters()) and not _has_quant_experts(model):
        return False
    setter = getattr(model, "set_experts_implementation", None)
    config = getattr(model, "config", None)
    if callable(setter) and getattr(config, "_experts_implementation", "eager") != "eager":
        setter("eager")
    return True


def _has_quant_experts(model: nn.Module) -> bool:
    return any(getattr(m, "serves_experts", False) for m in model.modules())


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    mod = model.get_submodule(name)
    assert isinstance(mod, nn.Linear), name
    return mod


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule (or parameter) at dotted `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child in parent._parameters:  # a fused parameter becomes a module: drop the parameter first
        del parent._parameters[child]
    setattr(parent, child, new)
