"""Units beyond nn.Linear: fused 3-D experts (Mixtral, Qwen3-MoE) and transposed linears (GPT-2's Conv1D).

Tiny random models built offline with AutoConfig.for_model; every base method goes through quantize → save →
reload (requant.load and from_pretrained) with logits equal to the in-memory quantized model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import requant
from helpers import byte_tokenizer, requant_config
from requant.calibration import InputStatistics, expert_token_counts, layer_inputs
from requant.config import QuantConfig
from requant.errors import CheckpointError, ConfigError
from requant.eval import evaluate
from requant.format import save_checkpoint
from requant.format.qlinear import QuantExperts
from requant.model import coverage, quantizable_layers, unit_ref, unit_weight, use_eager_experts
from requant.pipeline import expert_importance_fallback, quantize
from requant.sensitivity import gradient_sums


def _tiny(model_type: str, seed: int = 0, **kw) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=257, bos_token_id=256, eos_token_id=256, pad_token_id=None, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger-than-default init so quantization visibly changes the loss
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model


def tiny_mixtral(seed: int = 0) -> nn.Module:
    return _tiny(
        "mixtral",
        seed,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )


def tiny_qwen3_moe(seed: int = 0) -> nn.Module:
    return _tiny(
        "qwen3_moe",
        seed,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )


def tiny_gpt2(seed: int = 0) -> nn.Module:
    return _tiny("gpt2", seed, n_embd=32, n_layer=2, n_head=4, n_positions=128)


BUILDERS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt2": tiny_gpt2}


# ----------------------------------------------------------------------------------------------------------
# Discovery, accessors, coverage


def test_expert_units_are_per_expert_matrices_that_alias_the_fused_parameter():
    model = tiny_mixtral()
    layers = quantizable_layers(model)
    experts = [i for i in layers if i.expert is not None]
    assert len(layers) == 2 * (4 + 2 * 4) and len(experts) == 2 * 2 * 4
    up = next(i for i in layers if i.name == "model.layers.1.mlp.experts.gate_up_proj.3")
    assert (up.block, up.kind, up.expert, up.out_features, up.in_features) == (1, "gate_up_proj", 3, 96, 32)
    assert up.parameter == "model.layers.1.mlp.experts.gate_up_proj"
    param = model.get_parameter(up.parameter)
    w = unit_weight(model, up.name)
    assert w.shape == (96, 32) and torch.equal(w, param[3])
    with torch.no_grad():
        w.fill_(0.5)  # a writable view of the live parameter
    assert torch.all(param[3] == 0.5) and not torch.all(param[2] == 0.5)
    assert not any(i.kind == "gate" for i in layers)  # the router stays in 16 bits
    with pytest.raises(ConfigError, match="not a quantizable unit"):
        unit_ref(model, "model.layers.0.mlp.experts.gate_up_proj.4")


def test_conv1d_units_are_transposed_views():
    model = tiny_gpt2()
    layers = quantizable_layers(model)
    assert [i.kind for i in layers[:4]] == ["c_attn", "c_proj", "c_fc", "c_proj"]
    assert all(i.transposed and i.expert is None for i in layers)
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (layers[0].out_features, layers[0].in_features) == (96, 32) == tuple(c_attn.weight.shape[::-1])
    x = torch.randn(3, 32)
    # The unit is the matrix F.linear multiplies by: Conv1D(x) = F.linear(x, Wᵀ, b).
    torch.testing.assert_close(c_attn(x), nn.functional.linear(x, unit_weight(model, layers[0].name), c_attn.bias))


def test_coverage_share_and_refusal_of_unhandled_block_parameters():
    model = tiny_mixtral()
    cov = coverage(model, quantizable_layers(model))
    router = 4 * 32
    block = 2 * 32 * 32 + 2 * 16 * 32 + 4 * (96 * 32 + 32 * 48) + router  # q, o; k, v; experts; router
    assert cov.block_weights == 2 * block and cov.quantized_weights == 2 * (block - router)
    assert (
        cov.summary()
        == f"quantized {100 * (block - router) / block:.1f}% of block weights (12 of 13 matrices in each block)"
    )
    assert cov.excluded == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    assert not cov.unhandled
    # A ≥ 2-D parameter nobody handles: refused by name, never a silent partial model ...
    model.model.layers[1].mlp.register_parameter("mystery", nn.Parameter(torch.randn(6, 32)))
    with pytest.raises(ConfigError, match=r"parameter model\.layers\.1\.mlp\.mystery \(6, 32\) .* neither quantized"):
        quantizable_layers(model)
    # ... unless the user excludes it, or chooses the units explicitly.
    assert len(quantizable_layers(model, exclude=[r"mlp\.mystery"])) == 24
    assert len(quantizable_layers(model, include=[r"q_proj"])) == 2
    cov = coverage(model, quantizable_layers(model, exclude=["mystery"]), ["mystery"])
    assert "model.layers.1.mlp.mystery" in cov.excluded and "(24 of 27 matrices over 2 blocks)" in cov.summary()


def test_experts_of_one_parameter_are_selected_together():
    with pytest.raises(ConfigError, match=r"3 of the 4 experts of model\.layers\.0\.mlp\.experts\.down_proj"):
        quantizable_layers(tiny_mixtral(), exclude=[r"layers\.0\.mlp\.experts\.down_proj\.2$"])
    layers = quantizable_layers(tiny_mixtral(), exclude=[r"experts\.down_proj"])
    assert len(layers) == 2 * (4 + 4)


def test_the_default_experts_implementation_is_switched_to_the_eager_loop():
    model = tiny_qwen3_moe()
    assert model.config._experts_implementation != "eager"  # transformers 5 defaults to grouped_mm
    ids = torch.randint(0, 256, (1, 12))
    before = model(ids).logits
    assert use_eager_experts(model) and model.config._experts_implementation == "eager"
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert not use_eager_experts(tiny_gpt2())


# ----------------------------------------------------------------------------------------------------------
# MoE calibration


def _routed_inputs(model: nn.Module, windows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Slow reference: the hidden states each expert's gate_up_proj reads, from the router's own top-k."""
    out: dict[str, list[torch.Tensor]] = {}
    handles = []
    for b, layer in enumerate(model.model.layers):

        def hook(mod, args, kwargs, b=b):  # (hidden, top_k_index, top_k_weights)
            hidden, top_k = args[0], args[1]
            for e in range(4):
                rows = (top_k == e).any(-1)
                out.setdefault(f"model.layers.{b}.mlp.experts.gate_up_proj.{e}", []).append(hidden[rows])

        handles.append(layer.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def test_expert_input_statistics_come_from_the_tokens_routed_to_each_expert(windows):
    model = tiny_mixtral()
    use_eager_experts(model)
    names = [i.name for i in quantizable_layers(model)]
    stats = layer_inputs(model, names, windows, min_tokens=0)
    ref = _routed_inputs(model, windows)
    assert set(ref) <= set(stats)
    for name, parts in ref.items():
        x = torch.cat(parts).double()
        assert stats[name].tokens == x.shape[0]
        torch.testing.assert_close(stats[name].hessian.double(), x.T @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[name].extra["abs_mean"].double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)
    counts = expert_token_counts(model, names, windows)
    assert {n: counts[n] for n in ref} == {n: stats[n].tokens for n in ref}
    # Every token reaches exactly top-k = 2 experts in each block.
    assert sum(counts[f"model.layers.0.mlp.experts.down_proj.{e}"] for e in range(4)) == 2 * windows.numel()


def test_experts_with_too_few_tokens_get_pooled_statistics(windows):
    model = tiny_mixtral()
    use_eager_experts(model)
    names = [i.name for i in quantizable_layers(model) if "experts.down_proj" in i.name and ".layers.0." in i.name]
    own = layer_inputs(model, names, windows, min_tokens=0)
    with InputStatistics(model, names, min_tokens=10**6) as st:
        with torch.no_grad():
            for w in windows:
                st.new_pass()
                model(input_ids=w[None], use_cache=False)
        pooled = st.result()
    assert sorted(st.fallback) == sorted(names) and st.tokens == {n: own[n].tokens for n in names}
    total = sum(own[n].tokens for n in names)
    h = sum(own[n].hessian.double() for n in names)
    for n in names:
        assert pooled[n].tokens == total
        torch.testing.assert_close(pooled[n].hessian.double(), h, rtol=1e-5, atol=1e-5)


def test_an_expert_no_token_reached_gets_the_weight_only_objective():
    model = tiny_mixtral()
    use_eager_experts(model)
    names = ["model.layers.0.mlp.experts.gate_up_proj.0", "model.layers.0.mlp.experts.gate_up_proj.1"]
    with InputStatistics(model, names, min_tokens=1) as st:
        res = st.result()  # no forward pass at all
    assert st.tokens == dict.fromkeys(names, 0) and sorted(st.fallback) == names
    assert torch.equal(res[names[0]].hessian, torch.eye(32)) and res[names[0]].tokens == 0


def test_expert_importance_fallback_is_uniform_at_the_siblings_mean():
    f = {f"p.{e}": torch.full((2, 3), float(e + 1)) for e in range(3)} | {"q": torch.ones(2, 2)}
    tokens = {"p.0": 0, "p.1": 50, "p.2": 40}
    out, low = expert_importance_fallback(f, tokens, 32)
    assert low == ["p.0"] and torch.equal(out["p.0"], torch.full((2, 3), 2.5))
    assert out["p.1"] is f["p.1"] and out["q"] is f["q"]
    out, low = expert_importance_fallback(f, {"p.0": 0, "p.1": 0, "p.2": 0}, 1)
    assert sorted(low) == ["p.0", "p.1", "p.2"] and torch.equal(out["p.1"], torch.full((2, 3), 2.0))


def test_expert_gradients_are_slices_of_the_fused_parameters_gradient(windows):
    model = tiny_qwen3_moe()
    use_eager_experts(model)
    names = [i.name for i in quantizable_layers(model)]
    sums = gradient_sums(model, names, windows[:2])
    param = model.get_parameter("model.layers.1.mlp.experts.down_proj")
    param.requires_grad_(True)
    model.zero_grad()
    for w in windows[:2]:
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1]
        nn.functional.cross_entropy(logits, w[1:], reduction="sum").backward()
    for e in range(4):
        torch.testing.assert_close(sums.grads[f"model.layers.1.mlp.experts.down_proj.{e}"], param.grad[e])
    assert all(sums.grads[n].is_contiguous() and sums.grads[n]._base is None for n in names)


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline, every base, save and reload


CASES = {
    "rtn": lambda t: QuantConfig(base="rtn", bits=3, calib=str(t), nsamples=2, seqlen=32),
    "squeezellm-dns": lambda t: QuantConfig(
        base="squeezellm", bits=3, outliers=0.5, significant=0.5, calib=str(t), nsamples=2, seqlen=32
    ),
    "requant": lambda t: requant_config(t),
    "gptq": lambda t: QuantConfig(base="gptq", bits=3, group_size=16, calib=str(t), nsamples=2, seqlen=32),
    "awq": lambda t: QuantConfig(base="awq", bits=3, group_size=16, calib=str(t), nsamples=2, seqlen=32),
    "qtip": lambda t: QuantConfig(base="qtip", bits=2, calib=str(t), nsamples=2, seqlen=32),
}


@pytest.mark.parametrize("base", list(CASES))
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_quantize_save_reload_equal_logits(arch, base, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    if (arch == "gpt2" and base in ("squeezellm-dns", "qtip")) or (arch == "qwen3_moe" and base == "qtip"):
        pytest.skip("kept out of the CI budget: the same unit kinds are covered by the other rows")
    tok = byte_tokenizer()
    model = BUILDERS[arch]()
    result = quantize(model, tok, CASES[base](text_file))
    report = result.report
    assert report["coverage"]["share"] > 0.98 and "of block weights" in report["coverage"]["summary"]
    moe = arch != "gpt2"
    if moe:
        experts = report["experts"]
        assert experts["min_tokens"] == 32
        if base == "rtn":  # no calibration read at all: nothing measured
            assert experts["tokens"] is None
        else:
            assert len(experts["tokens"]) == 16 and set(experts["fallback"]) <= set(experts["tokens"])
            # Tokens of one block: each token went to top-2 experts.
            assert sum(v for k, v in experts["tokens"].items() if ".0.mlp.experts.down_proj" in k) == 2 * 2 * 32
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    ck = save_checkpoint(tmp_path / "ck", model, tok, result, dense="fp32")
    loaded, _ = requant.load(ck)
    if moe:
        assert isinstance(loaded.model.layers[0].mlp.experts.gate_up_proj, QuantExperts)
        assert loaded.config._experts_implementation == "eager"
    assert torch.equal(loaded(ids).logits, expected)
    plain = AutoModelForCausalLM.from_pretrained(ck)
    assert torch.equal(plain(ids).logits, expected)
    # save_pretrained writes the same layout back.
    plain.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again(ids).logits, expected)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    assert math.isfinite(evaluate(loaded, windows).perplexity)
    gen = loaded.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 10) and torch.equal(gen, model.generate(ids[:, :6], max_new_tokens=4, do_sample=False))


def test_quant_experts_serve_the_stored_orientation_and_dtype(text_file, tmp_path):
    model = tiny_mixtral()
    result = quantize(model, byte_tokenizer(), CASES["rtn"](text_file))
    ck = save_checkpoint(tmp_path / "ck", model, byte_tokenizer(), result, dense="fp32")
    loaded, _ = requant.load(ck)
    qe = loaded.model.layers[1].mlp.experts.down_proj
    assert qe.shape == model.model.layers[1].mlp.experts.down_proj.shape == (4, 32, 48)
    assert torch.equal(qe[2], model.model.layers[1].mlp.experts.down_proj[2])
    assert qe[torch.tensor(3)].shape == (32, 48)  # the eager loop indexes with 0-d tensors
    flipped = QuantExperts(list(qe._modules.values()), transposed=True)
    assert torch.equal(flipped[1], model.model.layers[1].mlp.experts.down_proj[1].T)
    loaded.to(torch.bfloat16)
    assert qe[0].dtype == torch.bfloat16


def test_a_checkpoint_listing_part_of_a_fused_parameter_is_refused(text_file, tmp_path):
    import json

    model = tiny_mixtral()
    result = quantize(model, byte_tokenizer(), CASES["rtn"](text_file))
    ck = save_checkpoint(tmp_path / "ck", model, byte_tokenizer(), result)
    cfg = json.loads((ck / "config.json").read_text())
    qc = cfg["quantization_config"]
    del qc["layers"]["model.layers.0.mlp.experts.down_proj.3"]
    qc["quantized_layers"] -= 1
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        requant.load(ck, verify=False)


def test_dequantized_export_restacks_experts_and_transposes_conv1d(text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from requant.export import export_dequantized

    for arch in ("qwen3_moe", "gpt2"):
        model = BUILDERS[arch]()
        result = quantize(model, byte_tokenizer(), CASES["rtn"](text_file))
        ck = save_checkpoint(tmp_path / arch, model, byte_tokenizer(), result, dense="fp32")
        out, n = export_dequantized(ck, tmp_path / f"{arch}-plain", dtype="fp32")
        assert n == len(result.layers)
        plain = AutoModelForCausalLM.from_pretrained(out)
        ids = torch.randint(0, 256, (1, 16))
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_quantize_and_inspect_report_the_share_and_the_experts_tokens(capsys, text_file, tmp_path):
    from requant.cli import main

    src = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    flags = ["--base", "squeezellm", "--bits", "3", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32"]
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), *flags, "--expert-min-tokens", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    share = "quantized 99.4% of block weights (12 of 13 matrices in each block)"
    assert out[1] == share
    report = json.loads((tmp_path / "q" / "requant_report.json").read_text())["report"]
    tokens, fell = report["experts"]["tokens"], report["experts"]["fallback"]
    assert fell == sorted(n for n, t in tokens.items() if t < 20)  # the Fisher fallback, by the same counts
    assert out[2].startswith(f"experts: 16 expert matrices saw {min(tokens.values())}–{max(tokens.values())}")
    assert f"{len(fell)} below 20 fell back" in out[2]
    assert main(["inspect", str(tmp_path / "q"), "--summary"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert share in lines and any(x.startswith("experts: 16 expert matrices") for x in lines)


def test_blocks_are_the_outer_list_even_when_a_block_holds_more_experts_than_there_are_blocks():
    from requant.model import find_blocks

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.experts = nn.ModuleList(Expert() for _ in range(6))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    prefix, blocks = find_blocks(Toy())
    assert prefix == "layers" and len(blocks) == 2
    layers = quantizable_layers(Toy())
    assert len(layers) == 2 * (1 + 6 * 2) and {i.block for i in layers} == {0, 1}
