import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from requant.config import QuantConfig
from requant.errors import CheckpointError, InputError, OutputError
from requant.format import (
    QuantLinear,
    load_checkpoint,
    load_quantized,
    quant_linears,
    read_layers,
    save_checkpoint,
    set_kernel_mode,
)
from requant.format.checkpoint import read_header
from requant.format.layout import LayerLayout
from requant.pipeline import quantize


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from helpers import byte_tokenizer, tiny_llama

    text = tmp_path_factory.mktemp("text") / "t.txt"
    g = torch.Generator().manual_seed(3)
    words = ["alpha", "beta", "gamma", "delta", "quant", "weight", "loss", "model", "token", "layer"]
    text.write_text(" ".join(words[i] for i in torch.randint(0, 10, (3000,), generator=g).tolist()))
    model, tok = tiny_llama(), byte_tokenizer()
    cfg = QuantConfig(base="squeezellm", bits=3, outliers=1.0, significant=0.5, calib=str(text), nsamples=2, seqlen=32)
    result = quantize(model, tok, cfg)
    return model, tok, result


@pytest.fixture
def ckpt(quantized, tmp_path) -> Path:
    model, tok, result = quantized
    return save_checkpoint(tmp_path / "ckpt", model, tok, result)


def test_reload_gives_identical_logits_and_weights(quantized, ckpt):
    model, _, result = quantized
    loaded, tok = load_quantized(ckpt)
    assert {n for n, _ in quant_linears(loaded)} == set(result.layers)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # ties survive
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        set_kernel_mode(loaded, "reference")
        assert torch.equal(loaded(ids).logits, expected)  # the reference path is bit-exact
        set_kernel_mode(loaded, "auto")
        assert torch.equal(loaded(ids).logits, expected)  # many rows: dequantize + BLAS, still bit-exact
        step = loaded(ids[:1, :1]).logits  # decode-sized: kernel sums, equal within fp32 rounding
        torch.testing.assert_close(step, expected[:1, :1], rtol=0, atol=1e-4)
    _, _, back = load_checkpoint(ckpt)
    for name, q in result.layers.items():
        assert torch.equal(back.layers[name].weight(), q.weight())
    assert back.bit_count() == result.bit_count()
    assert tok.decode(tok("quant")["input_ids"]) == "quant"


def test_stored_bytes_equal_the_accounting_plus_row_pointers(quantized, ckpt):
    _, _, result = quantized
    header = read_header(ckpt / "quantized.safetensors")
    stored = sum(nbytes for _, _, nbytes in header.values())
    meta = json.loads((ckpt / "requant.json").read_text())
    assert meta["stored_bytes"] == stored and meta["format_version"] == 1
    layouts = {n: LayerLayout.from_meta(lm, n) for n, lm in meta["layers"].items()}
    rowptr_bytes = sum(4 * (lo.out_features + 1) for lo in layouts.values() if lo.nnz)
    assert 8 * stored == result.bit_count().total_bits + 8 * rowptr_bytes  # widths 64/96: no padding
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert cfg["format_version"] == 1 and cfg["bits"] == 3
    assert cfg["sparse_entries"] == result.bit_count().sparse_entries


def write_v0(out: Path, model, tok, result) -> None:
    """The v0 writer of the foundation (unpacked codes, flat int32 sparse index), kept to test loading."""
    out.mkdir()
    quant, layers_meta = {}, {}
    for name, q in result.layers.items():
        meta, tensors = q.dense.to_state()
        for k, t in tensors.items():
            quant[f"{name}.{k}"] = t.contiguous()
        quant[f"{name}.sparse_index"] = q.sparse.index.to(torch.int32)
        quant[f"{name}.sparse_value"] = q.sparse.value.contiguous()
        layers_meta[name] = {**meta, "shape": list(q.dense.shape), "nnz": q.sparse.nnz, "block": q.info.block}
    skip = {f"{n}.weight" for n in result.layers}
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in skip and k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    save_file(quant, str(out / "quantized.safetensors"))
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    bits = result.bit_count()
    cfg["quantization_config"] = {
        "quant_method": "requant",
        "format_version": 0,
        "bits": 3,
        "sparse_entries": bits.sparse_entries,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(out)
    meta = {"format_version": 0, "config": result.config.to_dict(), "layers": layers_meta, "bits": bits.to_dict()}
    (out / "requant.json").write_text(json.dumps(meta))


def test_v0_checkpoints_still_load(quantized, tmp_path):
    model, tok, result = quantized
    write_v0(tmp_path / "v0", model, tok, result)
    loaded, _ = load_quantized(tmp_path / "v0")
    set_kernel_mode(loaded, "reference")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in result.layers)


def test_a_checkpoint_without_tokenizer_loads(quantized, tmp_path):
    model, _, result = quantized
    out = save_checkpoint(tmp_path / "notok", model, None, result)
    loaded, tok = load_quantized(out)
    assert tok is None and isinstance(loaded.get_submodule(next(iter(result.layers))), QuantLinear)


def test_refuses_different_checkpoint_unless_force(quantized, ckpt):
    model, tok, result = quantized
    save_checkpoint(ckpt, model, tok, result)  # same config: allowed
    other = type(result)(QuantConfig(base="rtn", bits=4), result.layers, {})
    with pytest.raises(InputError, match="differs in: base, bits"):
        save_checkpoint(ckpt, model, tok, other)
    save_checkpoint(ckpt, model, tok, other, force=True)


def test_failed_write_leaves_nothing(quantized, tmp_path, monkeypatch):
    model, tok, result = quantized
    import requant.format.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "write_json_atomic", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", model, tok, result)
    assert list(tmp_path.iterdir()) == []


def test_out_of_disk_is_one_clear_error_and_leaves_nothing(quantized, tmp_path, monkeypatch):
    import errno

    import requant.format.checkpoint as ck

    model, tok, result = quantized
    real = ck.save_file

    def full(tensors, path, **kw):
        real(tensors, path, **kw)
        if path.endswith(ck.QUANT_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OutputError, match=r"^no space left on .* while writing '.*ckpt'$"):
        save_checkpoint(tmp_path / "ckpt", model, tok, result)
    assert list(tmp_path.iterdir()) == []


def _rewrite(file: Path, fn) -> None:
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def _edit_json(file: Path, fn) -> None:
    obj = json.loads(file.read_text())
    fn(obj)
    file.write_text(json.dumps(obj))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (
            lambda d: (d / "quantized.safetensors").write_bytes((d / "quantized.safetensors").read_bytes()[:-100]),
            r"quantized\.safetensors.*truncated",
        ),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
            r"model\.safetensors.*truncated",
        ),
        (
            lambda d: (d / "quantized.safetensors").write_bytes(b"\xff" * 64),
            r"quantized\.safetensors.*corrupt header",
        ),
        (
            lambda d: _rewrite(d / "quantized.safetensors", lambda t: t.update({f"{Q}.lut": t[f"{Q}.lut"].float()})),
            rf"quantized\.safetensors.*tensor {Q}\.lut is F32 \[64, 8\], expected F16",
        ),
        (
            lambda d: _rewrite(
                d / "quantized.safetensors",
                lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :-3].contiguous()}),
            ),
            rf"tensor {Q}\.qweight is U8 \[64, 21\], expected U8 \[64, 24\]",
        ),
        (
            lambda d: _rewrite(d / "quantized.safetensors", lambda t: t.pop(f"{Q}.sparse_col")),
            rf"tensor {Q}\.sparse_col is missing",
        ),
        (
            lambda d: _rewrite(
                d / "quantized.safetensors", lambda t: t.update({f"{Q}.sparse_rowptr": -t[f"{Q}.sparse_rowptr"]})
            ),
            rf"tensor {Q}\.sparse_rowptr is not a non-decreasing",
        ),
        (
            lambda d: _rewrite(d / "quantized.safetensors", lambda t: t.update({"stray.weight": torch.zeros(3)})),
            r"tensor stray\.weight belongs to no quantized layer",
        ),
        (
            lambda d: _edit_json(d / "requant.json", lambda m: m.update(format_version=99)),
            r"format version 99 is unknown; this requant reads versions 0, 1",
        ),
        (
            lambda d: _edit_json(d / "requant.json", lambda m: m["layers"][Q].update(bits=4)),
            rf"tensor {Q}\.qweight is U8 \[64, 24\], expected U8 \[64, 32\] for a 4-bit",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(bits=4)),
            r"config\.json.*quantization_config\.bits = 4, but tensor .*\.qweight is stored with 3 bits",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(sparse_entries=1)),
            r"config\.json.*sparse_entries = 1",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(format_version=0)),
            r"config\.json.*format_version 0 differs",
        ),
        (lambda d: (d / "requant.json").write_text("{not json"), r"requant\.json.*unreadable"),
        (
            lambda d: _rewrite(d / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(3)})),
            r"model\.safetensors.*tensor model\.norm\.weight has shape \(3,\), the model expects \(64,\)",
        ),
        (
            lambda d: _rewrite(d / "model.safetensors", lambda t: t.update({"model.extra": torch.ones(3)})),
            r"model\.safetensors.*tensor model\.extra is not in the model",
        ),
        (
            lambda d: _rewrite(d / "model.safetensors", lambda t: t.pop("model.norm.weight")),
            r"model\.safetensors.*tensor model\.norm\.weight is missing",
        ),
    ],
)
def test_corrupt_checkpoints_are_refused_naming_file_and_tensor(ckpt, corrupt, pattern):
    corrupt(ckpt)
    with pytest.raises(CheckpointError, match=pattern):
        load_quantized(ckpt)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_loaded(ckpt, tmp_path):
    marker = tmp_path / "executed"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing"):
        load_quantized(ckpt)
    with pytest.raises(CheckpointError):
        read_layers(ckpt.parent / "nowhere")
    assert not marker.exists()


@pytest.mark.integration
def test_real_model_round_trip_and_stored_bytes(tmp_path):
    """R (first 5 blocks) at 3-bit RTN + 0.5% outliers: bit-exact reload, packed size within 2% of the accounting."""
    from requant.errors import InputError as AssetMissing
    from requant.loading import load_model

    try:
        model, tok = load_model()
    except AssetMissing as e:
        pytest.skip(str(e))
    result = quantize(model, tok, QuantConfig(base="rtn", bits=3, outliers=0.5, include=(r"\.layers\.[0-4]\.",)))
    assert len(result.layers) == 35
    out = save_checkpoint(tmp_path / "r", model, tok, result)
    loaded, _ = load_quantized(out)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)  # > 4 rows: bit-exact dequantize + BLAS
        step = loaded(ids[:, :1]).logits  # the decode kernel
        torch.testing.assert_close(step, expected[:, :1], rtol=0, atol=1e-3)
    header = read_header(out / "quantized.safetensors")
    stored = sum(nbytes for _, _, nbytes in header.values())
    accounted = result.bit_count().total_bits / 8
    assert accounted <= stored <= 1.02 * accounted
