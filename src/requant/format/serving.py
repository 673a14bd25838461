"""The output projection and the input embeddings served from their stored 16 bits (or an opt-in int8 lm_head).

A requant checkpoint stores its unquantized tensors in 16 bits, yet a model loaded in fp32 upcasts them: the tied
embedding / lm_head of a small model is then its largest matrix (SmolLM2-135M: 49,152 × 576, 113 MB in fp32) and
the lm_head reads all of it for every decoded token. Here both keep the stored 16-bit tensor (one tensor when
tied) and compute in fp32:
- `ServedEmbedding` looks rows up in the 16-bit table and widens them to fp32: exactly the values of the
  upcast model (fp16/bf16 → fp32 is exact).
- `ServedLinear` multiplies fp32 inputs by the 16-bit matrix widened to fp32 in registers (the C kernels, up to
  DENSE_MAX_ROWS input rows, summing in fp32: equal to the fp32 model within fp32 reassociation, the
  QuantLinear fast path's tolerance) or, for more rows (prefill of every position, perplexity), by fp32 blocks
  of DENSE_BLOCK_ROWS output rows through BLAS, so no full fp32 copy is ever made.
- `--lm-head int8` (opt-in, lossy): the output projection as int8 with one fp32 scale per row,
  q = round(w / s), s = max|w_row| / 127; ŵ = q · s. The embeddings stay 16-bit.
Inference only: the served modules hold no gradients and are not what `save_pretrained` should write.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import kernels, ops

LM_HEAD_CHOICES = ("auto", "16bit", "int8", "fp32")
DENSE_MAX_ROWS = 4  # input rows up to which the register-widening kernel beats widening a block + BLAS
DENSE_BLOCK_ROWS = 4096  # output rows widened to fp32 at a time for many input rows (9 MB at 576 inputs)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 per-row scales) of a matrix: symmetric, s = max|w_row| / 127, q = round(w / s). Works
    through DENSE_BLOCK_ROWS rows at a time, so a 16-bit vocabulary-sized matrix never has an fp32 copy."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for r0 in range(0, w.shape[0], DENSE_BLOCK_ROWS):
        blk = w[r0 : r0 + DENSE_BLOCK_ROWS].float()
        s = blk.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale, codes 0
        q[r0 : r0 + DENSE_BLOCK_ROWS] = torch.round(blk / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r0 : r0 + DENSE_BLOCK_ROWS] = s
    return q, scale


class ServedLinear(nn.Module):
    """y = x Ŵᵀ (+ b) in fp32 with Ŵ kept as stored: fp16 / bf16, or int8 with fp32 per-row scales."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype not in (*SIXTEEN_BIT, torch.int8) or weight.dim() != 2:
            raise ValueError(f"ServedLinear holds a 2-D fp16, bf16 or int8 matrix, not {weight.dtype} {weight.dim()}-D")
        if (scale is None) != (weight.dtype != torch.int8):
            raise ValueError("an int8 matrix needs per-row scales, a 16-bit one none")
        self.out_features, self.in_features = weight.shape
        # a Parameter is kept as is: a tied embedding and this head share one
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach(), requires_grad=False)
        self.register_buffer("scale", None if scale is None else scale.detach().float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._desc: kernels.LayerDesc | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._desc = None  # the descriptor points into the old storage
        return super()._apply(fn, recurse)

    def dequantize(self) -> torch.Tensor:
        """Ŵ in fp32 (the stored values widened; int8: q · s)."""
        w = self.weight.float()
        return w * self.scale[:, None] if self.scale is not None else w

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        for r0 in range(0, self.out_features, DENSE_BLOCK_ROWS):
            r1 = min(r0 + DENSE_BLOCK_ROWS, self.out_features)
            w = self.weight[r0:r1].float()
            if self.scale is not None:
                w *= self.scale[r0:r1, None]
            y[:, r0:r1] = x @ w.T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return ops.packed_linear(self, x)  # an opaque custom op in a compiled graph, same result
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The forward pass outside torch.compile."""
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        lib = kernels.library() if x2.is_cpu and self.weight.is_cpu else None
        if lib is not None and 0 < x2.shape[0] <= DENSE_MAX_ROWS:
            if self._desc is None:
                self._desc_weight = self.weight.contiguous()  # the descriptor points into it: keep it alive
                self._desc = kernels.describe_dense(self._desc_weight, self.scale)
            y = kernels.gemm(lib, self._desc, x2)
        elif x2.is_cpu:
            y = self._blocks(x2)
        else:
            y = F.linear(x2, self.dequantize().to(x2.device))
        if self.bias is not None:
            y += self.bias
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "int8 (per-row scales)" if self.scale is not None else str(self.weight.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={kind}, compute=fp32"


class ServedEmbedding(nn.Module):
    """Embedding lookup in a 16-bit table, widened to `out_dtype` (exact for fp32)."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach(), requires_grad=False)
        self.padding_idx, self.out_dtype = padding_idx, out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={str(self.weight.dtype).removeprefix('torch.')}"


def keep_stored_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Before a checkpoint's tensors are loaded: make the embeddings and output projection parameters of `dtype`
    (the 16 bits they are stored in), so the loader fills them without an fp32 copy (peak memory)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = _tied(model)
    for mod in (emb, head):
        if type(mod) in (nn.Embedding, nn.Linear) and mod.weight.dtype != dtype:  # what serve_dense serves
            w = mod.weight
            mod.weight = nn.Parameter(torch.empty(w.shape, dtype=dtype, device=w.device), requires_grad=False)
    if tied and type(head) is nn.Linear and type(emb) is nn.Embedding:
        head.weight = emb.weight


def _tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def serve_dense(
    model: nn.Module,
    lm_head: str = "auto",
    *,
    stored_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> str:
    """Swap the model's input embeddings and output projection for served modules, in place; what was done.

    lm_head: "auto"/"16bit" serve both in `stored_dtype` (the 16-bit dtype the checkpoint stores; the
    float values must be representable in it, which holds for tensors loaded from 16 bits), "int8" serves the
    output projection in int8 (embeddings 16-bit when `stored_dtype` is given, else as loaded), "fp32" changes
    nothing. "auto" without a 16-bit `stored_dtype` (a model not loaded from 16 bits) changes nothing.
    `compute_dtype`: the dtype the embeddings hand to the first block (the model's own).
    """
    if lm_head not in LM_HEAD_CHOICES:
        raise ConfigError(f"lm_head {lm_head!r} is not one of {', '.join(LM_HEAD_CHOICES)}")
    if stored_dtype is not None and stored_dtype not in SIXTEEN_BIT:
        stored_dtype = None
    if lm_head == "16bit" and stored_dtype is None:
        stored_dtype = torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float16
    if lm_head == "fp32" or (lm_head == "auto" and stored_dtype is None):
        return "as loaded"
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    # exact types: a subclass may do more than a lookup / a product (Gemma scales its embeddings in forward)
    emb_ok, head_ok = type(emb) is nn.Embedding, type(head) is nn.Linear
    if lm_head != "auto" and not head_ok:
        raise ConfigError(
            f"--lm-head {lm_head}: the model's output projection is a {type(head).__name__}, not an nn.Linear"
        )
    tied = emb_ok and head_ok and _tied(model)
    done = []
    with torch.no_grad():
        table = None
        if emb_ok and stored_dtype is not None:
            table = emb.weight.to(stored_dtype).contiguous()
            # loaded in the stored dtype (keep_stored_dtype): exact by construction, no fp32 copy to compare with
            if emb.weight.dtype != stored_dtype and not torch.equal(table.float(), emb.weight):
                raise ConfigError(f"the input embeddings are not exactly representable in {stored_dtype}")
            served_emb = ServedEmbedding(table, emb.padding_idx, compute_dtype)
            table = served_emb.weight
            model.set_input_embeddings(served_emb)
            done.append(f"embeddings {str(stored_dtype).removeprefix('torch.')}")
        if head_ok and lm_head == "int8":
            q, s = quantize_rows_int8(head.weight)
            model.set_output_embeddings(ServedLinear(q, s, head.bias))
            done.insert(0, "lm_head int8 (per-row scales)")
        elif head_ok and stored_dtype is not None:
            w = table if tied and table is not None else head.weight.to(stored_dtype).contiguous()
            if not tied and head.weight.dtype != stored_dtype and not torch.equal(w.float(), head.weight):
                raise ConfigError(f"the output projection is not exactly representable in {stored_dtype}")
            model.set_output_embeddings(ServedLinear(w, None, head.bias))
            shared = " (one tensor with the embeddings)" if tied and table is not None else ""
            done.insert(0, f"lm_head {str(stored_dtype).removeprefix('torch.')}{shared}")
    return ", ".join(done) or "as loaded"


__all__ = [
    "DENSE_BLOCK_ROWS",
    "DENSE_MAX_ROWS",
    "LM_HEAD_CHOICES",
    "ServedEmbedding",
    "ServedLinear",
    "keep_stored_dtype",
    "quantize_rows_int8",
    "serve_dense",
]
