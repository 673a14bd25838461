"""requant export --dequantize: a plain transformers checkpoint of Ŵ that loads without requant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_llama
from requant import load
from requant.cli import main
from requant.config import QuantConfig
from requant.export import plain_model
from requant.format import QuantLinear, quant_linears, save_checkpoint, set_kernel_mode
from requant.model import quantizable_layers, set_module
from requant.pipeline import quantize

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@torch.no_grad()
def test_plain_model_computes_what_quant_linear_computes_for_every_kind(make_layer):
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = True  # biases travel too
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    kinds = [dict(kind="lut"), dict(kind="uniform", group=16), dict(kind="awq"), dict(kind="trellis")]
    for i, info in enumerate(quantizable_layers(model)):
        q = make_layer(info.out_features, info.in_features, 3, nnz=40, seed=i, **kinds[i % len(kinds)])
        set_module(model, info.name, QuantLinear.from_layer(q, model.get_submodule(info.name).bias))
    set_kernel_mode(model, "reference")  # the ground truth: F.linear on Ŵ
    expected = model(IDS).logits
    w_hat = {name: ql.dequantize() for name, ql in quant_linears(model)}
    plain = plain_model(model, torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    for name, w in w_hat.items():
        assert torch.equal(plain.get_submodule(name).weight, w)
        assert torch.equal(plain.get_submodule(name).bias, model.get_submodule(name).bias)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # ties survive
    assert torch.equal(plain(IDS).logits, expected)  # fp32: bit for bit
    half = plain_model(model, torch.float16)
    for name, w in w_hat.items():
        assert torch.equal(half.get_submodule(name).weight, w.half())  # one rounding of Ŵ, nothing else


# Runs in a fresh interpreter that never imports requant: what a user of another stack does.
PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {}
    ids = torch.tensor(json.loads(sys.argv[3]))
    for tag, path in (("fp32", sys.argv[1]), ("fp16", sys.argv[2])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()  # the stored dtype
        out[f"{tag}_dtype_is_stored"] = torch.tensor(model.dtype == getattr(torch, {"fp32": "float32",
            "fp16": "float16"}[tag]))
        wide = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[f"{tag}_logits"] = wide(ids).logits
        for k, t in wide.state_dict().items():
            out[f"{tag}.{k}"] = t.contiguous()
        tok = AutoTokenizer.from_pretrained(path)
        out[f"{tag}_tok"] = torch.tensor(tok("quant beta")["input_ids"])
    assert not any(m == "requant" or m.startswith("requant.") for m in sys.modules), "requant was imported"
    save_file({k: v.clone() for k, v in out.items()}, sys.argv[4])
    """
)


def test_export_loads_in_plain_transformers_with_quant_linear_logits(capsys, tmp_path, tokenizer, text_file):
    model = tiny_llama()
    result = quantize(model, tokenizer, QuantConfig(base="rtn", bits=3, outliers=1.0))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer, result)
    for dtype in ("fp32", "fp16"):
        code, out, _ = run(
            capsys, "export", str(ckpt), "-o", str(tmp_path / dtype), "--dequantize", "--dtype", dtype, "--json"
        )
        assert code == 0
        report = json.loads(out)
        assert report["layers"] == len(result.layers) and report["dtype"] == dtype
        config = json.loads((tmp_path / dtype / "config.json").read_text())
        assert "quantization_config" not in config  # nothing asks a loader for requant
        assert (tmp_path / dtype / "generation_config.json").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    dump = tmp_path / "plain.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_LOAD,
            str(tmp_path / "fp32"),
            str(tmp_path / "fp16"),
            json.dumps(IDS.tolist()),
            str(dump),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    got = load_file(dump)
    loaded, _ = load(ckpt)
    set_kernel_mode(loaded, "reference")
    with torch.no_grad():
        expected = loaded(IDS).logits
    assert got["fp32_dtype_is_stored"] and got["fp16_dtype_is_stored"]
    assert torch.equal(got["fp32_logits"], expected)  # fp32 export: exactly QuantLinear's logits
    for name, ql in quant_linears(loaded):
        w = ql.dequantize()
        assert torch.equal(got[f"fp32.{name}.weight"], w)
        assert torch.equal(got[f"fp16.{name}.weight"], w.half().float())
    # fp16 export: the logits move only by Ŵ's (and the embeddings') rounding to fp16, far less than dropping
    # the sparse residual does.
    fp16_err = (got["fp16_logits"] - expected).abs().max()
    assert fp16_err < 2e-3 * expected.abs().max()
    for _, ql in quant_linears(loaded):
        ql.sparse_value.zero_()
        ql._invalidate()
    with torch.no_grad():
        assert fp16_err < (loaded(IDS).logits - expected).abs().max() / 10
    assert got["fp32_tok"].tolist() == got["fp16_tok"].tolist() == tokenizer("quant beta")["input_ids"]


def test_export_refuses_bad_requests_in_one_line(capsys, tmp_path, tokenizer, model_dir):
    model = tiny_llama()
    result = quantize(model, tokenizer, QuantConfig(base="rtn", bits=3))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer, result)
    (tmp_path / "taken").mkdir()
    cases = [
        (["export", str(ckpt), "-o", str(tmp_path / "a")], "needs --dequantize"),
        (["export", str(ckpt), "-o", str(tmp_path / "a"), "--dequantize", "--dtype", "int8"], "--dtype 'int8'"),
        (["export", str(ckpt), "-o", str(tmp_path / "taken"), "--dequantize"], "already exists; pass --force"),
        (["export", str(model_dir), "-o", str(tmp_path / "a"), "--dequantize"], "is not a requant checkpoint"),
        (["export", str(ckpt), "-o", str(ckpt), "--dequantize", "--force"], "is the checkpoint itself"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, argv
    assert not (tmp_path / "a").exists() and not any((tmp_path / "taken").iterdir())
    code, _, _ = run(capsys, "export", str(ckpt), "-o", str(tmp_path / "taken"), "--dequantize", "--force")
    assert code == 0 and (tmp_path / "taken" / "config.json").is_file()


@pytest.mark.parametrize("dtype", ["bf16"])
def test_bf16_export_rounds_w_hat_once(tmp_path, tokenizer, dtype):
    from requant.export import export_dequantized

    model = tiny_llama()
    result = quantize(model, tokenizer, QuantConfig(base="rtn", bits=3, outliers=1.0))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer, result)
    out, n = export_dequantized(ckpt, tmp_path / "out", dtype=dtype)
    stored = load_file(out / "model.safetensors")
    loaded, _ = load(ckpt)
    assert n == len(result.layers)
    for name, ql in quant_linears(loaded):
        assert stored[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(stored[f"{name}.weight"], ql.dequantize().bfloat16())
