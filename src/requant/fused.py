"""The fused batch-1 decode step of Llama-family decoders: one C call per token instead of a few hundred framework
calls per block (the loop around it: requant.decode.FusedDecoder).

At batch 1 a small quantized model spends as much time in Python and torch dispatch (norms, rotary, cache updates,
residuals: ~25 ops per block) as in its matmuls. `rq_llama_step` (format/csrc/qgemm.c) runs the whole step in C:
RMSNorm, q/k/v (with biases), rotary embedding from the model's own cos/sin tables, grouped-query attention over
a static cache, o-projection, gated SiLU MLP, final norm, output projection and argmax. For a large 16/32-bit
output projection (a vocabulary of ≥ SCREEN_MIN_ROWS rows: the largest matrix of a small model, read in full per
token) an int8 copy with per-row scales screens the rows first: each screened logit is within a known bound of the
head's (half a step per weight times ‖x‖₁), so only rows whose bound reaches the best lower bound can hold the
argmax, and those few are recomputed by the head: the greedy token is the 16-bit head's own, to the bit, for a
quarter of its bytes (the screen costs that quarter again in memory; the head's pages of a zero-copy checkpoint
are released once screened). Its linear layers are the same kernel descriptors the modules use (packed
QuantLinear codes + sparse residual, AWQ's x / s, 16-bit/int8 served heads, fp32 nn.Linear), so a quantized layer
reads its b bits per weight as in the module path.

Which models: the decoder's blocks (`get_decoder().layers`) must have exactly the Llama layout — `self_attn` with
q/k/v/o projections, `mlp` with gate/up/down projections, two RMSNorms — a SiLU MLP, full attention, and a rotary
module on the decoder; that covers Llama, Mistral (within its window), Qwen2, SmolLM and their fine-tunes.
Config fields that change the logits after the head (HEAD_MODIFIERS) are refused; other families that share the
layout but not the arithmetic (multipliers, norms of 1 + w) are caught by a self-check: the first decode step
runs both ways, through the fused step and through the model's own blocks, and the fused path is kept only when
their outputs agree (else a warning, and the static decoder goes on). Prefill runs the model's blocks (batched,
BLAS) into a transformers StaticCache whose key/value tensors the fused step then reads and extends in place.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import memory
from .format import kernels
from .format.qlinear import QuantLinear
from .format.serving import ServedEmbedding, ServedLinear, quantize_rows_int8

# Config fields of families that change the logits after the output projection (Granite, Gemma 2, Cohere): the
# fused head is a plain projection, so a non-neutral value is refused.
HEAD_MODIFIERS = ("logits_scaling", "final_logit_softcapping", "logit_scale")
BLOCK_LAYOUT = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ACTIVATIONS = ("silu", "swish")
# Self-check: max |fused − forward| over the blocks' final (normed) hidden state, relative to 1 + its max. Both
# sides sum in fp32 in different orders (~1e-6 relative); Granite's multipliers, say, differ by O(1).
SELF_CHECK_RTOL = 1e-3
# Output projections of at least this many rows get an int8 screen (a quarter of a 16-bit head's bytes per token);
# the argmax stays the head's own, exactly (qgemm.c: rq_llama_step).
SCREEN_MIN_ROWS = 4096


class Unsupported(Exception):
    """The model's structure is outside what the fused step computes (the message says what)."""


def _linear(mod: nn.Module, name: str) -> tuple[kernels.LayerDesc, list]:
    """(kernel descriptor for one input row: y = Ŵx + b, tensors it points into) of a linear-like module."""
    if isinstance(mod, QuantLinear):
        runner = mod._kernel or mod._prepare()
        if runner is None:
            raise Unsupported(f"{name}: no kernel for its storage")
        desc = getattr(runner, "desc", None)
        if desc is not None:
            kernels.interleave(kernels.library(), desc)
            in_scale = getattr(runner, "in_scale", None)  # AWQ: the kernel runs on x / s
            if in_scale is not None:
                desc = kernels.LayerDesc.from_buffer_copy(desc)  # the module's own descriptor stays as it is
                desc.in_div = in_scale.data_ptr()
            return desc, [runner]
        if runner.gemm is None:  # a decoded fp32 Ŵ (trellis): a plain fp32 matrix
            w = runner.weight()
            b = None if mod.bias is None else mod.bias.detach().float().contiguous()
            return kernels.describe_dense(w, bias=b), [w, b]
        raise Unsupported(f"{name}: kind {mod.layout.kind} has no single-row kernel")
    if isinstance(mod, ServedLinear):
        w = mod.weight.detach().contiguous()
        b = None if mod.bias is None else mod.bias.detach().float().contiguous()
        return kernels.describe_dense(w, mod.scale, b), [w, b, mod.scale]
    if type(mod) is nn.Linear:
        w = mod.weight.detach()
        if w.dtype != torch.float32 or not w.is_cpu:
            raise Unsupported(f"{name}: a {w.dtype} linear on {w.device} (fp32 on CPU only)")
        w = w.contiguous()
        b = None if mod.bias is None else mod.bias.detach().float().contiguous()
        return kernels.describe_dense(w, bias=b), [w, b]
    raise Unsupported(f"{name}: {type(mod).__name__} is not a linear layer the fused step runs")


def _norm(mod: nn.Module, name: str) -> tuple[torch.Tensor, float]:
    w = getattr(mod, "weight", None)
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    if "RMSNorm" not in type(mod).__name__ or w is None or eps is None or getattr(mod, "bias", None) is not None:
        raise Unsupported(f"{name}: {type(mod).__name__} is not an RMSNorm with a weight")
    return w.detach().float().contiguous(), float(eps)


class LlamaStep:
    """The fused step's tables for one model and cache length: build raises `Unsupported` for models outside the
    Llama layout or without the kernels; `bind(cache)` points it at a filled transformers StaticCache; `run`
    decodes one token (its logits land in `logits`)."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        lib = kernels.library()
        if lib is None:
            raise Unsupported(f"no C kernels ({kernels.status()})")
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise Unsupported(f"the fused step runs on CPU, the model is on {device}")
        self.lib, self.model, self.max_len = lib, model, max_len
        self._build()

    def _build(self) -> None:
        model, cfg = self.model, self.model.config
        for field in HEAD_MODIFIERS:
            if getattr(cfg, field, None) not in (None, 1, 1.0):
                raise Unsupported(f"{field} = {getattr(cfg, field)} changes the logits after the output projection")
        act = getattr(cfg, "hidden_act", None)
        if act not in ACTIVATIONS:
            raise Unsupported(f"MLP activation {act!r} (the fused step computes {'/'.join(ACTIVATIONS)})")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        blocks = getattr(decoder, "layers", None)
        if not isinstance(blocks, nn.ModuleList) or not len(blocks):
            raise Unsupported("no decoder.layers list of blocks")
        prefix = "layers"
        rotary = getattr(decoder, "rotary_emb", None)
        final = getattr(decoder, "norm", None)
        if rotary is None or final is None:
            raise Unsupported("no rotary module or final norm on the decoder")
        self.keep: list = []
        descs: list[kernels.BlockDesc] = []
        eps_all = set()
        self.layer_descs: list[kernels.LayerDesc] = []
        for i, block in enumerate(blocks):
            where = f"{prefix}.{i}"
            names = {n for n, _ in block.named_children()}
            if names != BLOCK_LAYOUT:
                raise Unsupported(f"{where} has {sorted(names)}, not the Llama block layout {sorted(BLOCK_LAYOUT)}")
            attn, mlp = block.self_attn, block.mlp
            extra = {n for n, _ in attn.named_children()} - set(ATTN_LINEARS)
            extra |= {n for n, _ in mlp.named_children()} - set(MLP_LINEARS) - {"act_fn"}
            if extra:
                raise Unsupported(f"{where} has {sorted(extra)} beyond the Llama attention/MLP")
            if getattr(attn, "sliding_window", None) and self.max_len > attn.sliding_window:
                raise Unsupported(f"{where}: sliding-window attention ({attn.sliding_window}) below {self.max_len}")
            bd = kernels.BlockDesc()
            for field, (owner, n) in zip(
                ("q", "k", "v", "o", "gate", "up", "down"),
                [(attn, n) for n in ATTN_LINEARS] + [(mlp, n) for n in MLP_LINEARS],
                strict=True,
            ):
                d, keep = _linear(getattr(owner, n), f"{where}.{n}")
                self.layer_descs.append(d)
                self.keep.append(keep)
                setattr(bd, field, ctypes.pointer(d))
            for field, n in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                w, eps = _norm(getattr(block, n), f"{where}.{n}")
                eps_all.add(eps)
                self.keep.append(w)
                setattr(bd, field, w.data_ptr())
            descs.append(bd)
        w_final, eps = _norm(final, "final norm")
        eps_all.add(eps)
        if len(eps_all) != 1:
            raise Unsupported(f"norms with different epsilons {sorted(eps_all)}")
        emb = model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding | ServedEmbedding):
            raise Unsupported(f"input embeddings {type(emb).__name__}")
        if emb.weight.dtype not in kernels.DENSE_MODES or emb.weight.dtype == torch.int8:
            raise Unsupported(f"input embeddings in {emb.weight.dtype}")
        head_desc, head_keep = _linear(model.get_output_embeddings(), "output projection")
        self.keep += [head_keep, w_final, emb.weight]

        a0 = blocks[0].self_attn
        n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = a0.head_dim
        hidden = emb.weight.shape[1]
        q_out, k_out = a0.q_proj.out_features, a0.k_proj.out_features
        if q_out != n_heads * head_dim or k_out != n_kv * head_dim or n_heads % n_kv or head_dim % 2:
            raise Unsupported(f"attention widths q {q_out}, k {k_out} vs {n_heads}/{n_kv} heads of {head_dim}")
        with torch.inference_mode():
            pos = torch.arange(self.max_len)[None]
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        if self.cos.shape != (self.max_len, head_dim):
            raise Unsupported(f"rotary tables of shape {tuple(self.cos.shape)}, not ({self.max_len}, {head_dim})")

        m = kernels.LlamaDesc()
        m.n_blocks, m.hidden, m.n_heads, m.n_kv, m.head_dim = len(blocks), hidden, n_heads, n_kv, head_dim
        m.inter, m.max_len, m.vocab = blocks[0].mlp.gate_proj.out_features, self.max_len, head_desc.out
        m.eps, m.scaling = eps_all.pop(), float(getattr(a0, "scaling", head_dim**-0.5))
        self.block_array = (kernels.BlockDesc * len(descs))(*descs)
        m.blocks = self.block_array
        m.final_norm, m.embed = w_final.data_ptr(), emb.weight.data_ptr()
        m.embed_mode = kernels.DENSE_MODES[emb.weight.dtype]
        self.head_desc = head_desc
        m.head = ctypes.pointer(head_desc)
        self.screen_desc = self._screen(head_desc, head_keep)
        if self.screen_desc is not None:
            m.screen = ctypes.pointer(self.screen_desc)
        m.cos, m.sin = self.cos.data_ptr(), self.sin.data_ptr()
        self.scratch = torch.empty(int(self.lib.rq_llama_scratch(ctypes.addressof(m))), dtype=torch.float32)
        self.logits = torch.empty(m.vocab, dtype=torch.float32)
        m.scratch, m.logits = self.scratch.data_ptr(), self.logits.data_ptr()
        self.desc = m
        self.n_blocks = len(blocks)

    def _screen(self, head: kernels.LayerDesc, keep: list) -> kernels.LayerDesc | None:
        """An int8 copy (per-row scales) of a 16- or 32-bit output projection of many rows, which the step reads
        instead of the head to find the few rows that can hold the argmax (recomputed exactly from the head).
        `keep`: what `_linear` returned beside the head's descriptor (a dense head: its weight, then its bias)."""
        if head.mode not in (2, 3, 5) or head.out < SCREEN_MIN_ROWS:
            return None
        w, bias = keep[0], keep[1]
        q = torch.empty(w.shape, dtype=torch.int8)
        scale = torch.empty(head.out, dtype=torch.float32)
        for r0 in range(0, head.out, SCREEN_MIN_ROWS):
            rows = w[r0 : r0 + SCREEN_MIN_ROWS]
            q[r0 : r0 + SCREEN_MIN_ROWS], scale[r0 : r0 + SCREEN_MIN_ROWS] = quantize_rows_int8(rows)
            # decoding reads a few rows of the head per token from here on: a zero-copy checkpoint's pages can go
            memory.release_file_pages(rows.data_ptr(), rows.numel() * rows.element_size())
        self.keep.append((q, scale))
        return kernels.describe_dense(q, scale, bias)

    def bind(self, cache: object) -> None:
        """Point each block at a StaticCache's key/value tensors (allocated by the first prefill)."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.n_blocks:
            raise Unsupported("the static cache has no per-block key/value layers")
        shape = (1, self.desc.n_kv, self.max_len, self.desc.head_dim)
        for i, layer in enumerate(layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            for t in (k, v):
                if t is None or tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous():
                    raise Unsupported(f"cache layer {i} is not an fp32 {shape} tensor pair")
            self.block_array[i].kc, self.block_array[i].vc = k.data_ptr(), v.data_ptr()

    @property
    def hidden(self) -> torch.Tensor:
        """The last step's final hidden state (after the final norm; what the head reads), (hidden,)."""
        return self.scratch[self.desc.hidden : 2 * self.desc.hidden]

    def head(self, h: torch.Tensor, exact: bool = False) -> int:
        """The head's argmax for a final hidden state h (hidden,), through the screen unless `exact`."""
        h = h.detach().float().contiguous()
        return int(self.lib.rq_llama_head(ctypes.addressof(self.desc), h.data_ptr(), int(exact)))

    def run(self, token: int, pos: int, exact: bool = False) -> int:
        """Feed `token` at position `pos` (the cache holds the positions before it); the greedy next token (the
        head's own argmax either way). `logits` then holds the head's logits with `exact`, else the screen's."""
        return kernels.llama_step(self.lib, self.desc, token, pos, exact)


__all__ = ["LlamaStep", "Unsupported"]
