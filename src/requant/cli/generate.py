"""`requant generate`: greedy (or sampled) continuation of a prompt with a checkpoint or a model."""

from __future__ import annotations

import argparse
import math
import time

from ..errors import ConfigError
from .common import add_decoder_flags, add_lm_head_flag, add_verify_flag, emit


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint (or a plain model)")
    p.add_argument("checkpoint", help="requant checkpoint directory (or a model dir / .gguf)")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest token set of this mass (0, 1]"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_decoder_flags(
        p,
        "greedy decode loop on CPU: auto (default: fused where the model has the Llama block layout, else "
        "static), fused (one C call per token, requant.fused), static (static KV cache, requant.decode) or "
        "transformers' generate (sampling always uses transformers)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_lm_head_flag(p)
    add_verify_flag(p)
    return p


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse settings that would decode wrongly in silence (a NaN temperature used to mean greedy)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature {temperature} is not allowed; use a finite number ≥ 0 (0: greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"--top-p {top_p} is not allowed; use a number in (0, 1]")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import load

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    model, tok = load(args.checkpoint, device=args.device, verify=args.verify, lm_head=args.lm_head)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(
                f"--chat: the tokenizer of {args.checkpoint!r} has no chat template (drop --chat to continue the "
                "prompt as plain text)"
            )
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty after tokenization")
    ids = ids.to(args.device)
    sample = args.temperature > 0
    torch.manual_seed(args.seed)
    kwargs = (
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if sample else {"do_sample": False}
    )
    from ..decode import plain_greedy

    # the static decoder is a plain argmax: a model whose generation config adds penalties goes through generate
    static = not sample and args.decoder != "transformers" and str(args.device) == "cpu"
    static = static and plain_greedy(model.generation_config)
    t0 = time.perf_counter()
    used = "transformers"
    if static:
        from ..decode import make_decoder

        eos = model.generation_config.eos_token_id if model.generation_config is not None else tok.eos_token_id
        dec = make_decoder(model, ids.shape[1] + args.max_new_tokens, args.decoder, compile=args.compile)
        out = dec.generate(ids, args.max_new_tokens, eos)
        used = dec.kind
    else:
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                **kwargs,
            )
    wall = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    obj = {
        "prompt": args.prompt,
        "continuation": text,
        "new_tokens": int(new.numel()),
        "prompt_tokens": int(ids.shape[1]),
        "wall_s": wall,
        "decoder": used,
    }
    emit(args, obj, text)
    return 0
