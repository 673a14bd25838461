"""Tiny offline test models and a byte-level tokenizer (importable from tests: `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("alpha", "beta", "gamma", "delta", "quant", "weight", "loss", "model", "token", "layer")


def word_text(path: Path, *, seed: int = 3, n: int = 3000) -> Path:
    """`n` words drawn (seeded) from a 10-word vocabulary, written to `path`: calibration text for tiny models."""
    idx = torch.randint(0, len(WORDS), (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    path.write_text(" ".join(WORDS[i] for i in idx), encoding="utf-8")
    return path


def byte_tokenizer(*, add_bos: bool = False, bos: bool = True):
    """A byte-level tokenizer with 256 byte tokens plus <s>: deterministic and fully offline. `add_bos`: it puts
    <s> (id 256) before every text, as Llama's does; `bos=False`: it has no BOS token at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="<s>")


def requant_config(text_file, **kw):
    """A small ReQuant setting for tiny models: SqueezeLLM 3-bit, 1% Algorithm-1 outliers, 0.5% PQI values in two
    steps (2 Gauss nodes), 2 windows of 32 tokens from `text_file`; `kw` overrides any field."""
    from requant.config import QuantConfig

    base = {
        "base": "squeezellm",
        "bits": 3,
        "outliers": 1.0,
        "outlier_select": "adaptive",
        "significant": 0.5,
        "significant_select": "pqi",
        "step": 0.25,
        "pqi_nodes": 2,
        "pqi_rule": "gauss",
        "calib": str(text_file),
        "nsamples": 2,
        "seqlen": 32,
        "alg1_steps": 2,
        "alg1_max_factor": 2.0,
    }
    base.update(kw)
    return QuantConfig(**base)


def tiny_llama(
    seed: int = 0, *, layers: int = 2, hidden: int = 64, inter: int = 96, vocab: int = 257, tie: bool = True
):
    """A random Llama-architecture causal LM small enough for unit tests (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Larger-than-default init so quantization visibly changes the loss.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


_TRAINED: dict[tuple, dict] = {}


def trained_tiny_llama(text: str, *, steps: int = 80, seed: int = 0):
    """A tiny Llama briefly trained on `text` (byte tokens), so quantization quality comparisons mean something.

    Training runs once per (text, steps, seed) and is cached; each call returns a fresh copy.
    """
    key = (hash(text), steps, seed)
    if key not in _TRAINED:
        model = tiny_llama(seed)
        ids = torch.tensor(byte_tokenizer()(text)["input_ids"], dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - 65, (8,), generator=gen)
            batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = tiny_llama(seed)
    model.load_state_dict(_TRAINED[key])
    return model


def packed_random(model, bits: int = 3, kind: str = "lut"):
    """The model's block linears replaced by random packed QuantLinears (+2% sparse residual; kind "lut" with
    small LUT values, else `random_layer`'s kinds), its other weights rounded to fp16 and the embeddings / lm_head
    served in 16 bits: a loaded checkpoint's shape."""
    from requant.format import QuantLinear
    from requant.format.serving import serve_dense
    from requant.model import LayerInfo, set_module
    from requant.quantizers import LUTTensor
    from requant.results import QuantizedLayer
    from requant.sparse import SparseResidual

    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers"):
            out, inp = mod.out_features, mod.in_features
            if kind != "lut":
                q = random_layer(out, inp, bits, kind, nnz=out * inp // 50, group=32, seed=len(name))
                set_module(model, name, QuantLinear.from_layer(q))
                continue
            codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
            lut = (torch.randn(out, 2**bits, generator=g) * 0.1).half()
            idx = torch.randperm(out * inp, generator=g)[: out * inp // 50].sort().values
            sparse = SparseResidual(idx, (torch.randn(idx.numel(), generator=g) * 0.1).half(), (out, inp))
            q = QuantizedLayer(LayerInfo(name, 0, name, out, inp), LUTTensor(codes, lut, bits), sparse)
            set_module(model, name, QuantLinear.from_layer(q))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    serve_dense(model, "auto", stored_dtype=torch.float16)
    return model


def random_layer(
    out: int,
    inp: int,
    bits: int,
    kind: str = "lut",
    nnz: int = 0,
    group: int | None = None,
    sym: bool = False,
    seed: int = 0,
) -> object:
    """A QuantizedLayer with random codes, tables (LUT, scale/zero per group, AWQ's per-input scale or a trellis
    tensor's signs and scale) and sparse residual. Kind "trellis" uses tiles of 4 × 8 (L = 8): shapes must fit."""
    from requant.model import LayerInfo
    from requant.quantizers import LUTTensor, ScaledUniformTensor, TrellisTensor, UniformTensor
    from requant.quantizers.qtip.hadamard import pack_signs, random_signs
    from requant.results import QuantizedLayer
    from requant.sparse import SparseResidual

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    if kind == "lut":
        dense = LUTTensor(codes, torch.randn(out, 2**bits, generator=g).half(), bits)
    elif kind == "trellis":
        signs = pack_signs(random_signs(inp, g)), pack_signs(random_signs(out, g))
        dense = TrellisTensor(codes, *signs, torch.tensor([0.03]).half(), bits, 8, 1, "1mad", (4, 8))
    else:
        group = group or inp
        scale = (torch.rand(out, inp // group, generator=g) / 10 + 0.01).half()
        zero = None if sym else torch.randint(0, 2**bits, (out, inp // group), generator=g).half()
        dense = UniformTensor(codes, scale, zero, bits, group)
        if kind == "awq":
            in_scale = (torch.rand(inp, generator=g) * 4 + 0.25).half()
            dense = ScaledUniformTensor(codes, scale, zero, bits, group, in_scale=in_scale)
    index = torch.randperm(out * inp, generator=g)[:nnz].sort().values
    sparse = SparseResidual(index, torch.randn(nnz, generator=g).half(), (out, inp))
    return QuantizedLayer(LayerInfo("blk.0.proj", 0, "proj", out, inp), dense, sparse)
