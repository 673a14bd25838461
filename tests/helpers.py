"""Tiny offline test models and a byte-level tokenizer (importable from tests: `from helpers import ...`)."""

from __future__ import annotations

import torch


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
