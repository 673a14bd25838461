"""The architecture matrix: every tested family × base method, quantized → saved → reloaded (tests/arch_cases.py).

One quantization per (family, base), shared by its checks through a module-scoped fixture. A family marked
`xfail` there is expected to fail today (strict: the mark must go when the family works)."""

from __future__ import annotations

import shutil

import pytest
import torch

from arch_cases import (
    ARCHS,
    BASES,
    CHECKS,
    build_model,
    check_complete,
    quant_config,
    run_case,
    tokenizer,
    write_texts,
)
from helpers import byte_tokenizer
from requant import quantize
from requant.progress import quiet_transformers


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("texts"))


def _param(arch: str, base: str):
    reason = ARCHS[arch].xfail
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param((arch, base), id=f"{arch}-{base}", marks=marks)


@pytest.fixture(scope="module", params=[_param(a, b) for a in ARCHS for b in BASES])
def case(request, texts, tmp_path_factory):
    arch, base = request.param
    calib, evaluation = texts
    directory = tmp_path_factory.mktemp(f"{arch}-{base}")
    with quiet_transformers():
        c = run_case(arch, base, directory, calib=calib, evaluation=evaluation)
    # A model quantized only in part is not a case to test further: every other check would pass on it.
    check_complete(c)
    yield c
    shutil.rmtree(directory, ignore_errors=True)  # checkpoints hold the 49k-token embeddings: do not pile up


@pytest.mark.parametrize("check", [name for name in CHECKS if name != "complete"])
def test_architecture_matrix(case, check):
    CHECKS[check](case)


@pytest.mark.parametrize(("adds_bos", "same_as"), [(True, "always"), (False, "never")])
def test_bos_modes_pick_the_calibration_windows(texts, adds_bos, same_as):
    """--bos on a Llama-family model: with a tokenizer that adds BOS, `auto` calibrates exactly as `always` (every
    window starts with BOS); with the embedded one, which adds none, exactly as `never` (no window does)."""
    tok = byte_tokenizer(add_bos=True) if adds_bos else tokenizer()
    bos = tok.bos_token_id
    firsts, weights = {}, {}
    for mode in ("auto", "always", "never"):
        model = build_model("llama", vocab=len(tok))
        seen: list[torch.Tensor] = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda _m, args, _o, seen=seen: seen.append(args[0][:, 0])
        )
        result = quantize(model, tok, quant_config("gptq", texts[0], bos=mode))
        hook.remove()
        firsts[mode] = torch.cat(seen)
        weights[mode] = {n: q.weight() for n, q in result.layers.items()}
        assert result.config.bos == mode  # stored with the checkpoint's config
    assert (firsts["always"] == bos).all() and not (firsts["never"] == bos).any()
    assert torch.equal(firsts["auto"], firsts[same_as])
    other = "never" if same_as == "always" else "always"
    assert all(torch.equal(w, weights[same_as][n]) for n, w in weights["auto"].items())
    assert any(not torch.equal(w, weights[other][n]) for n, w in weights["auto"].items())
