"""Format v2 through transformers itself: from_pretrained / save_pretrained, refusal without requant, v1 upgrade."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import requant
from requant.config import QuantConfig
from requant.errors import CheckpointError
from requant.format import QuantLinear, convert, load_quantized, quant_linears, save_checkpoint, set_kernel_mode
from requant.format.checkpoint import INDEX_FILE, tensor_files
from requant.format.files import read_header
from requant.format.hf import register
from requant.format.layout import encode_layer
from requant.pipeline import quantize

# One tiny model per storage kind, each with sparse residuals.
CONFIGS = {
    "lut": dict(base="squeezellm", bits=3, outliers=1.0, significant=0.5),
    "uniform": dict(base="rtn", bits=4, group_size=32, outliers=1.0),
    "awq": dict(base="awq", bits=3, group_size=32, outliers=1.0, base_options={"n_grid": 5}),
    "trellis": dict(base="qtip", bits=2, outliers=1.0, base_options={"L": 6, "tile": (4, 8)}),
}
Q = "model.layers.0.self_attn.q_proj"
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from helpers import byte_tokenizer, tiny_llama, word_text

    text = tmp_path_factory.mktemp("text") / "t.txt"
    word_text(text)
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model, tok = tiny_llama(), byte_tokenizer()
            cfg = QuantConfig(calib=str(text), nsamples=4, seqlen=32, **CONFIGS[kind])
            cache[kind] = (model, tok, quantize(model, tok, cfg))
        return cache[kind]

    return get


def _logits(model) -> torch.Tensor:
    set_kernel_mode(model, "reference")
    with torch.no_grad():
        return model(IDS).logits


def _rounded_dense(model, result, dtype):
    """The in-memory quantized model with its unquantized tensors rounded as the checkpoint stores them."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.state_dict(keep_vars=True).items():  # what is stored (not rotary caches)
            owner = name.rpartition(".")[0]
            if owner in result.layers and not name.endswith(".bias"):
                continue
            if p.is_floating_point():
                p.copy_(p.to(dtype).float())
    return m


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_from_pretrained_gives_the_stored_model_for_every_kind(runs, kind, tmp_path):
    model, tok, result = runs(kind)
    ckpt = save_checkpoint(tmp_path / "q", model, tok, result)  # default: 16-bit unquantized tensors
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers, requant imported
    assert {n for n, _ in quant_linears(loaded)} == set(result.layers)
    assert {m.layout.kind for _, m in quant_linears(loaded)} == {kind}
    expected = _logits(_rounded_dense(model, result, torch.float16))
    assert torch.equal(_logits(loaded), expected)  # bit-exact with what the checkpoint stores
    via_requant, _ = requant.load(ckpt)
    assert torch.equal(_logits(via_requant), expected)
    # save_pretrained writes the same layout back; it loads to identical logits and identical tensors
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again), expected)
    first, second = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "again/model.safetensors"))
    for name in result.layers:
        for suffix in encode_layer(result.layers[name])[1]:
            assert torch.equal(first[f"{name}.{suffix}"], second[f"{name}.{suffix}"])


def test_dtype_and_device_map_are_honoured(runs, tmp_path):
    model, tok, result = runs("lut")
    ckpt = save_checkpoint(tmp_path / "q", model, tok, result)
    bf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert bf.model.embed_tokens.weight.dtype == torch.bfloat16
    ql = bf.get_submodule(Q)
    assert ql.weight.dtype == torch.uint8 and ql.lut.dtype == torch.float16  # stored tables are never cast
    with torch.no_grad():
        out = bf(IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = _logits(AutoModelForCausalLM.from_pretrained(ckpt))
    for device_map in ("cpu", "auto", {"": "cpu"}):
        m = AutoModelForCausalLM.from_pretrained(ckpt, device_map=device_map)
        assert torch.equal(_logits(m), ref)


def test_plain_transformers_without_requant_refuses_the_checkpoint(runs, tmp_path):
    model, tok, result = runs("lut")
    ckpt = save_checkpoint(tmp_path / "q", model, tok, result)
    code = (
        "import sys; from transformers import AutoModelForCausalLM\n"
        "assert 'requant' not in sys.modules\n"
        f"AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
        "print('LOADED')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "requant" in proc.stderr  # transformers names the unknown quant_method
    assert "weight" in proc.stderr and "mismatch" in proc.stderr.lower()  # the packed codes cannot load


def test_a_missing_quantized_tensor_is_named(runs, tmp_path):
    model, tok, result = runs("uniform")
    ckpt = save_checkpoint(tmp_path / "q", model, tok, result)
    from requant.format.files import file_metadata

    meta = file_metadata(ckpt / "model.safetensors")
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors[f"{Q}.scale"]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"tensor {Q}\.scale is missing"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_large_checkpoints_are_sharded_with_an_index(runs, tmp_path):
    model, tok, result = runs("lut")
    one = save_checkpoint(tmp_path / "one", model, tok, result)
    many = save_checkpoint(tmp_path / "many", model, tok, result, max_shard_bytes=20_000)
    files = tensor_files(many)
    assert len(files) > 2 and (many / INDEX_FILE).is_file() and not (many / "model.safetensors").exists()
    index = json.loads((many / INDEX_FILE).read_text())["weight_map"]
    merged = {}
    for f in files:
        merged.update(read_header(f))
        assert all(index[k] == f.name for k in read_header(f))
    assert merged == read_header(one / "model.safetensors")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(many)), _logits(load_quantized(one)[0]))


def test_unquantized_tensors_are_16_bit_by_default(runs, tmp_path):
    model, tok, result = runs("lut")
    small = save_checkpoint(tmp_path / "auto", model, tok, result)
    wide = save_checkpoint(tmp_path / "wide", model, tok, result, dense="fp32")
    header = read_header(small / "model.safetensors")
    assert header["model.embed_tokens.weight"][0] == torch.float16  # fp32 source: fp16 (it fits its range)
    assert read_header(wide / "model.safetensors")["model.embed_tokens.weight"][0] == torch.float32
    assert (small / "model.safetensors").stat().st_size < (wide / "model.safetensors").stat().st_size
    model.config.dtype = torch.bfloat16  # a bf16 source keeps its own dtype
    try:
        src16 = save_checkpoint(tmp_path / "bf", model, tok, result)
    finally:
        model.config.dtype = torch.float32
    assert read_header(src16 / "model.safetensors")["model.embed_tokens.weight"][0] == torch.bfloat16
    cfg = json.loads((small / "config.json").read_text())["quantization_config"]
    assert cfg["dense_dtype"] == "float16" and cfg["format_version"] == 2


def test_registration_is_idempotent():
    register()
    register()  # a second import of requant must not raise
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["requant"].__name__ == "RequantHfQuantizer"


def write_v1(out: Path, model, tok, result) -> None:
    """A format v1 checkpoint as requant 0.1 wrote it (qweight 2-D, quantized.safetensors, requant.json)."""
    out.mkdir()
    quant, layers_meta = {}, {}
    for name, q in result.layers.items():
        layout, tensors = encode_layer(q)
        for suffix, t in tensors.items():
            key = "qweight" if suffix == "weight" else suffix
            quant[f"{name}.{key}"] = t.reshape(t.shape[0], -1).contiguous() if suffix == "weight" else t
        layers_meta[name] = {**layout.to_meta(), "block": q.info.block, "kind_in_block": q.info.kind}
    skip = {f"{n}.weight" for n in result.layers}
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in skip and k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    save_file(quant, str(out / "quantized.safetensors"))
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    bits = result.bit_count()
    cfg["quantization_config"] = {
        "quant_method": "requant",
        "format_version": 1,
        "bits": result.config.bits,
        "sparse_entries": bits.sparse_entries,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(out)
    meta = {"format_version": 1, "config": result.config.to_dict(), "layers": layers_meta, "bits": bits.to_dict()}
    (out / "requant.json").write_text(json.dumps(meta))


def test_v1_checkpoints_load_and_convert_to_v2(runs, tmp_path):
    model, tok, result = runs("awq")
    write_v1(tmp_path / "v1", model, tok, result)
    old, _ = requant.load(tmp_path / "v1")
    expected = _logits(model)
    assert torch.equal(_logits(old), expected)
    v2 = convert(tmp_path / "v1", tmp_path / "v2", dense="fp32")
    assert json.loads((v2 / "config.json").read_text())["quantization_config"]["format_version"] == 2
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(v2)), expected)
    assert all(isinstance(m, QuantLinear) for _, m in quant_linears(AutoModelForCausalLM.from_pretrained(v2)))


def test_a_model_config_that_disagrees_with_the_layer_table_is_refused(runs, tmp_path):
    model, tok, result = runs("lut")
    ckpt = save_checkpoint(tmp_path / "q", model, tok, result)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] += 8  # the skeleton's MLP no longer has the stored layers' shape
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.0\.mlp\.\w+_proj \(\d+×\d+\) is not a linear"):
        AutoModelForCausalLM.from_pretrained(ckpt)
