"""The checkpoint commands: requant inspect, generate and bench (on a tiny checkpoint)."""

import json

import pytest
import torch

from requant.cli import main
from requant.config import QuantConfig
from requant.format import save_checkpoint
from requant.format.checkpoint import read_header
from requant.pipeline import quantize


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ckpt_and_model(model, tokenizer, model_dir, tmp_path):
    result = quantize(model, tokenizer, QuantConfig(base="rtn", bits=3, outliers=1.0))
    out = save_checkpoint(
        tmp_path / "ckpt", model, tokenizer, result, metadata={"model": str(model_dir)}, dense="fp32"
    )  # fp32 dense: generate below compares with the in-memory model token for token
    return out, model, result


def test_inspect_json_matches_the_stored_tensors_and_the_accounting(capsys, ckpt_and_model):
    ckpt, _, result = ckpt_and_model
    code, out, _ = run(capsys, "inspect", str(ckpt), "--json")
    assert code == 0
    d = json.loads(out)
    header = read_header(ckpt / "model.safetensors")
    quantized = {k: v for k, v in header.items() if k.rpartition(".")[0] in result.layers and not k.endswith(".bias")}
    assert d["quantized_bytes"] == sum(nbytes for _, _, nbytes in quantized.values())
    assert d["quantized_bytes"] + d["other_bytes"] == sum(nbytes for _, _, nbytes in header.values())
    assert d["quantized_bytes"] == sum(lay["stored_bytes"] for lay in d["layers"])
    assert d["quantized_bytes"] == d["code_bytes"] + d["table_bytes"] + d["sparse_bytes"]
    assert d["bits_per_weight"] == pytest.approx(result.bit_count().bits_per_weight)
    assert d["sparse_entries"] == result.bit_count().sparse_entries
    assert len(d["layers"]) == len(result.layers)
    by_name = {lay["name"]: lay for lay in d["layers"]}
    for name, q in result.layers.items():
        assert by_name[name]["nnz"] == q.sparse.nnz
        assert by_name[name]["bits_per_weight"] == pytest.approx(q.bit_count().bits_per_weight)
    code, text, _ = run(capsys, "inspect", str(ckpt))
    assert code == 0 and "bits per weight" in text and next(iter(result.layers)) in text


def test_inspect_refuses_a_corrupt_checkpoint_in_one_line(capsys, ckpt_and_model):
    ckpt, _, _ = ckpt_and_model
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    code, out, err = run(capsys, "inspect", str(ckpt), "--json")
    assert code == 2 and out == "" and "truncated" in err and len(err.strip().splitlines()) == 1


def test_generate_prints_the_greedy_continuation(capsys, ckpt_and_model, tokenizer):
    ckpt, model, _ = ckpt_and_model
    code, out, _ = run(capsys, "generate", str(ckpt), "alpha beta", "--max-new-tokens", "6", "--json")
    assert code == 0
    obj = json.loads(out)
    ids = tokenizer("alpha beta", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # greedy decoding with the in-memory quantized model
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    expected = tokenizer.decode(ids[0, -6:], skip_special_tokens=True)
    assert obj["new_tokens"] == 6 and obj["continuation"] == expected
    code, out, _ = run(capsys, "generate", str(ckpt), "alpha beta", "--max-new-tokens", "6")
    assert code == 0 and out == expected + "\n"


def test_bench_reports_alternating_medians(capsys, ckpt_and_model):
    ckpt, _, _ = ckpt_and_model
    code, out, _ = run(
        capsys, "bench", str(ckpt), "--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "3", "--json"
    )
    assert code == 0
    d = json.loads(out)
    for key in ("prefill_speedup", "decode_speedup"):
        assert d[key] > 0
    q, f = d["quantized"], d["fp32"]
    assert len(q["decode_tok_s_runs"]) == len(f["prefill_tok_s_runs"]) == 3
    assert d["decode_speedup"] == pytest.approx(q["decode_tok_s"] / f["decode_tok_s"])
    assert sorted(q["decode_tok_s_runs"])[1] == q["decode_tok_s"]


def test_bench_needs_a_checkpoint(capsys, model_dir):
    code, _, err = run(capsys, "bench", str(model_dir))
    assert code == 2 and "not a requant checkpoint" in err


def test_generate_fused_static_and_transformers_decoders_agree(capsys, ckpt_and_model):
    ckpt, _, _ = ckpt_and_model
    outs = {}
    for decoder in ("auto", "fused", "static", "transformers"):
        code, out, _ = run(
            capsys, "generate", str(ckpt), "gamma delta", "--max-new-tokens", "12", "--json", "--decoder", decoder
        )
        assert code == 0
        outs[decoder] = json.loads(out)
    assert [outs[d]["decoder"] for d in outs] == ["fused", "fused", "static", "transformers"]
    assert len({o["continuation"] for o in outs.values()}) == 1
    code, out, _ = run(capsys, "generate", str(ckpt), "gamma", "--max-new-tokens", "4", "--lm-head", "int8", "--json")
    assert code == 0 and json.loads(out)["new_tokens"] >= 1
    with pytest.raises(SystemExit) as e:
        run(capsys, "generate", str(ckpt), "gamma", "--lm-head", "int4")
    assert e.value.code == 2 and "int4" in capsys.readouterr().err


def test_bench_runs_either_decoder(capsys, ckpt_and_model):
    ckpt, _, _ = ckpt_and_model
    base = ["bench", str(ckpt), "--prompt-tokens", "6", "--new-tokens", "2", "--repeats", "1", "--json"]
    for decoder, used in (("auto", "fused"), ("static", "static"), ("transformers", "transformers")):
        code, out, _ = run(capsys, *base, "--decoder", decoder)
        assert code == 0
        d = json.loads(out)
        assert d["decoder"] == decoder and d["decoder_used"] == used and d["quantized"]["decode_tok_s"] > 0
