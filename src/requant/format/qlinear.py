"""QuantLinear: a drop-in nn.Linear whose weight stays packed in memory.

Buffers are named after the layout's tensors (`weight` = the packed codes, `lut` | `scale`/`zero`,
`sparse_rowptr`, `sparse_col`, `sparse_value`), so a checkpoint's tensors load straight into them (by
`from_pretrained` through requant's transformers quantizer, format.hf).

Two forward paths:
- reference: unpack → decode (LUT gather or (code − zero)·scale) → add the sparse residual → F.linear on
  the fp32 weight. This is the ground truth: identical, bit for bit, to nn.Linear holding ŵ.
- fast (C kernels, format.kernels): up to DECODE_MAX_ROWS input rows (decode) never materialise Ŵ: each
  row is decoded in registers and dotted with the inputs, so a token reads b bits per weight instead of 32.
  Its result equals the reference within fp32 reassociation error (|Δy| ≤ FAST_PATH_RTOL · Σ|ŵ·x|, tested).
  More rows (prefill) decode Ŵ once per call, bit-exactly, and use BLAS, so prefill stays bit-exact.
The fast path is used for inference on CPU when the kernels are available ("auto"); gradients, other
devices and a missing compiler fall back to the reference path.

Kind "awq" (uniform codes of W·diag(s), ŵ = uniform / s): the uniform kernel on x / s, its sparse values
pre-multiplied by s at their columns (within the same tolerance); prefill decodes the uniform part with the
kernel, divides by s and adds the residual, bit-exactly as the reference does.

Kind "trellis" (QTIP) has no C kernel. On first use its Ŵ is decoded once, by the reference decoder
(trellis decode, inverse RHTs, + sparse residual), and kept in fp32 beside the packed buffers (dropped, like
the kernels' fp32 table copies, on `.to()` and state-dict loads); every call is then F.linear on it, bit-exact
at any number of rows. Memory trade-off: the cache costs 32 bits per weight of RAM (an fp32 layer's worth) on
top of the packed codes, so a trellis QuantLinear saves disk, not RAM, once it has run. The alternatives
measured worse on CPU (1536×576, 2-bit, 1 thread): decoding per call costs ~70 ms of trellis decode per layer;
caching the transformed W̃ instead (same 32 bits per weight) and applying QTIP's RHT math per call,
U_outᵀ(W̃ (U_in x)), took 0.56 ms per token against 0.07 ms for F.linear on Ŵ, and prefill would re-form Ŵ
(8.5 ms). The RHT form only pays with a fused decode kernel that keeps W̃ compressed. The reference path
("reference" mode, gradients) decodes per call and keeps nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..model import LayerInfo, is_transposed_linear, set_module, unit_ref, use_eager_experts
from ..results import QuantizedLayer
from . import kernels, ops
from .kinds import Runner
from .layout import LayerLayout, decode_layer, encode_layer
from .names import COL, LUT, QWEIGHT, ROWPTR, SCALE, VALUE, ZERO

MODES = ("auto", "reference", "fast")
# Input rows up to which the decode kernel beats dequantize + BLAS (measured on R's shapes, 1 thread:
# 1536×576 at 3 bits: 84/150 µs at 1 row, 336/377 µs at 4, 452/436 µs at 6).
DECODE_MAX_ROWS = 4
# Tolerance of the fast decode path relative to Σ_i |ŵ_ri · x_i| per output. Both sides round in fp32
# (eps ≈ 1.2e-7): the kernel sums in 16 (AVX-512) or 8 (AVX2) lanes × 4 accumulators, BLAS in its own
# order. The largest error seen over the tested shapes (widths 1..1536) is ≈ 2.5e-7 of that sum.
FAST_PATH_RTOL = 2e-6


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ = dense(codes, tables) + sparse residual, stored packed."""

    def __init__(self, layout: LayerLayout, *, bias: bool = False, name: str = "") -> None:
        super().__init__()
        self.layout = layout
        self.name = name
        self.in_features, self.out_features = layout.in_features, layout.out_features
        for suffix, spec in layout.tensors().items():
            self.register_buffer(suffix, torch.zeros(spec.shape, dtype=spec.dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(layout.out_features))
        else:
            self.register_parameter("bias", None)
        self.mode = "auto"
        self.gemm_max_m = DECODE_MAX_ROWS  # ≤ kernels.GEMM_MAX_M
        self._kernel: Runner | None = None

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_layer(cls, q: QuantizedLayer, bias: torch.Tensor | None = None) -> QuantLinear:
        """Pack one pipeline QuantizedLayer (with the original layer's bias, if any)."""
        layout, tensors = encode_layer(q)
        mod = cls(layout, bias=bias is not None, name=q.info.name)
        for suffix, t in tensors.items():
            setattr(mod, suffix, t)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return mod

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Suffix → tensor, exactly the layout's tensors (what a checkpoint stores for this layer)."""
        return {k: getattr(self, k) for k in self.layout.tensors()}

    def quantized_layer(self, info: LayerInfo | None = None) -> QuantizedLayer:
        """The unpacked pipeline QuantizedLayer this module holds."""
        info = info or LayerInfo(self.name, None, self.name.rsplit(".", 1)[-1], self.out_features, self.in_features)
        return decode_layer(self.layout, {k: t.cpu() for k, t in self.stored_tensors().items()}, info)

    def packed(self) -> torch.Tensor:
        """The packed codes as the kernels read them: (out, ceil(in/8)·bits), a view of `weight`."""
        return self.weight.reshape(self.out_features, -1).contiguous()

    # -- reference path ----------------------------------------------------------------------------------

    def dequantize(self) -> torch.Tensor:
        """Ŵ in fp32 through the reference decoder (the pipeline's own QuantizedLayer.weight())."""
        info = LayerInfo(self.name, None, "", self.out_features, self.in_features)
        return decode_layer(self.layout, self.stored_tensors(), info).weight()

    def decoded_weight(self) -> torch.Tensor:
        """Ŵ in fp32 (out, in), bit-identical to `dequantize()`: through the fast path's decoder when it is
        available (it keeps fp32 tables), else the reference decoder."""
        runner = None if self.mode == "reference" else (self._kernel or self._prepare())
        return runner.weight() if runner is not None else self.dequantize()

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype).contiguous(), self.bias)

    # -- fast path --------------------------------------------------------------------------------------

    def sparse_f32(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat indices int64, fp32 values) of the sparse residual, or None without one."""
        if not self.layout.nnz:
            return None
        rowptr, col = getattr(self, ROWPTR).long(), getattr(self, COL).long()
        rows = torch.repeat_interleave(torch.arange(self.out_features), rowptr[1:] - rowptr[:-1])
        return rows * self.in_features + col, getattr(self, VALUE).float()

    def float_tables(self) -> dict[str, torch.Tensor]:
        """fp32 contiguous copies of the LUT / scale / zero tables and sparse values the kernels read."""
        return {k: getattr(self, k).float().contiguous() for k in (LUT, SCALE, ZERO, VALUE) if hasattr(self, k)}

    def _prepare(self) -> Runner | None:
        """The storage kind's fast-path runner over these buffers, or None if unavailable (then: reference)."""
        if self._kernel is None:
            if not self.weight.is_cpu:
                return None
            self._kernel = self.layout.storage.runner(self, kernels.library())
        return self._kernel

    def _invalidate(self) -> None:
        self._kernel = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return ops.packed_linear(self, x)  # an opaque custom op in a compiled graph, same result
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass outside torch.compile: reference or fast path (see the module docstring)."""
        if (
            self.mode == "reference"
            or not x.is_cpu
            or (x.requires_grad and torch.is_grad_enabled())
            or (self.bias is not None and self.bias.requires_grad and torch.is_grad_enabled())
        ):
            return self.forward_reference(x)
        runner = self._kernel or self._prepare()
        if runner is None:
            if self.mode == "fast":
                raise RuntimeError(f"QuantLinear fast path requested but unavailable: {kernels.status()}")
            return self.forward_reference(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if runner.gemm is not None and 0 < x2.shape[0] <= self.gemm_max_m:
            y = runner.gemm(x2)
        else:
            y = F.linear(x2, runner.weight(), None if self.bias is None else self.bias.float())
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        lo = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={lo.kind}, "
            f"bits={lo.bits}, nnz={lo.nnz}, bias={self.bias is not None}"
        )


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


def set_kernel_mode(model: nn.Module, mode: str) -> None:
    """Choose the forward path of every QuantLinear: "auto" (fast when possible), "reference" or "fast"."""
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {MODES}")
    for _, mod in quant_linears(model):
        mod.mode = mode


def swap_in(model: nn.Module, name: str, layout: LayerLayout, where: str) -> QuantLinear:
    """Replace the linear (or transposed linear, e.g. Conv1D) `name` by an empty QuantLinear of `layout` (its
    buffers to be filled by a loader); `where` names the layer table in the error when the model has no linear
    layer of that shape there. A transposed linear computes x W + b = F.linear(x, Wᵀ, b): the unit is Wᵀ."""
    try:
        lin = model.get_submodule(name)
    except AttributeError:
        lin = None
    shape = None
    if isinstance(lin, nn.Linear):
        shape = (lin.out_features, lin.in_features)
    elif lin is not None and is_transposed_linear(lin):
        shape = tuple(lin.weight.shape[::-1])  # type: ignore[union-attr, index]
    if shape != (layout.out_features, layout.in_features):
        raise CheckpointError(
            f"{where}: layer {name} ({layout.out_features}×{layout.in_features}) is not a linear layer of that "
            "shape in the model that config.json describes"
        )
    assert lin is not None
    ql = QuantLinear(layout, bias=getattr(lin, "bias", None) is not None, name=name)
    set_module(model, name, ql)
    return ql


class QuantExperts(nn.ModuleList):
    """The experts of one fused 3-D parameter (E, out, in) — or (E, in, out) when `transposed` — stored packed,
    one QuantLinear per expert under `<parameter>.<e>`.

    Indexing with an expert index returns that expert's Ŵ in the parameter's own orientation and the model's
    dtype, so the model's eager experts loop (`F.linear(x, self.gate_up_proj[e])`) runs unchanged; the model is
    switched to that loop (model.use_eager_experts). Speed trade-off: every call decodes the routed expert's
    whole matrix (the fast path's bit-exact decoder when available), i.e. a decode of each routed expert per
    forward instead of a packed GEMV; fine for prefill-sized batches, slower than a dense model for one-token
    decode. Memory stays packed (nothing is cached)."""

    serves_experts = True

    def __init__(self, experts: list[QuantLinear], *, transposed: bool = False, dtype: torch.dtype | None = None):
        super().__init__(experts)
        self.transposed = transposed
        # Follows the model's .to(dtype/device); not stored in checkpoints.
        self.register_buffer("_like", torch.zeros(0, dtype=dtype or torch.get_default_dtype()), persistent=False)

    def __getitem__(self, idx):  # type: ignore[no-untyped-def, override]
        if isinstance(idx, slice):
            return super().__getitem__(idx)
        entry = super().__getitem__(int(idx))
        w = entry.decoded_weight().to(self._like.dtype)
        return w.T if self.transposed else w

    @property
    def shape(self) -> torch.Size:
        """The shape of the fused parameter this module stands for."""
        first = super().__getitem__(0)
        o, i = first.out_features, first.in_features
        return torch.Size((len(self), i, o) if self.transposed else (len(self), o, i))


def install(model: nn.Module, layouts: Mapping[str, LayerLayout], where: str) -> None:
    """Replace every unit of a layer table by its empty packed module: linears and transposed linears by a
    QuantLinear, the experts `<parameter>.<e>` of a fused 3-D parameter by one QuantExperts (all E of them)."""
    groups: dict[str, dict[int, LayerLayout]] = {}
    for name, layout in layouts.items():
        try:
            ref = unit_ref(model, name)
        except Exception:
            ref = None
        if ref is not None and ref.index is not None:
            groups.setdefault(name.rpartition(".")[0], {})[ref.index] = layout
        else:
            swap_in(model, name, layout, where)
    for pname, entries in groups.items():
        param = model.get_parameter(pname)
        ref = unit_ref(model, f"{pname}.0")
        if sorted(entries) != list(range(param.shape[0])):
            raise CheckpointError(
                f"{where}: {len(entries)} of the {param.shape[0]} experts of {pname} are listed; a fused expert "
                "parameter is stored whole"
            )
        want = (param.shape[2], param.shape[1]) if ref.transposed else (param.shape[1], param.shape[2])
        for e, lo in entries.items():
            if (lo.out_features, lo.in_features) != want:
                raise CheckpointError(
                    f"{where}: layer {pname}.{e} ({lo.out_features}×{lo.in_features}) is not an expert of that "
                    "shape in the model that config.json describes"
                )
        experts = [QuantLinear(entries[e], name=f"{pname}.{e}") for e in range(param.shape[0])]
        set_module(model, pname, QuantExperts(experts, transposed=ref.transposed, dtype=param.dtype))
    if groups:
        use_eager_experts(model)


def replace_with_quant_linear(model: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    """Swap each quantized unit of an in-memory model for its packed form (QuantLinear; QuantExperts for the
    experts of a fused parameter)."""
    groups: dict[str, dict[int, QuantizedLayer]] = {}
    for name, q in layers.items():
        ref = unit_ref(model, name)
        if ref.index is not None:
            groups.setdefault(name.rpartition(".")[0], {})[ref.index] = q
            continue
        set_module(model, name, QuantLinear.from_layer(q, getattr(model.get_submodule(name), "bias", None)))
    for pname, entries in groups.items():
        param = model.get_parameter(pname)
        if sorted(entries) != list(range(param.shape[0])):
            raise CheckpointError(f"only {len(entries)} of the {param.shape[0]} experts of {pname} are quantized")
        transposed = unit_ref(model, f"{pname}.0").transposed
        experts = [QuantLinear.from_layer(entries[e]) for e in range(param.shape[0])]
        set_module(model, pname, QuantExperts(experts, transposed=transposed, dtype=param.dtype))
    if groups:
        use_eager_experts(model)


__all__ = [
    "DECODE_MAX_ROWS",
    "FAST_PATH_RTOL",
    "MODES",
    "QWEIGHT",
    "QuantExperts",
    "QuantLinear",
    "install",
    "quant_linears",
    "replace_with_quant_linear",
    "set_kernel_mode",
]
