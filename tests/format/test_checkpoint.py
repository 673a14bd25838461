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
    from helpers import byte_tokenizer, tiny_llama, word_text

    text = tmp_path_factory.mktemp("text") / "t.txt"
    word_text(text)
    model, tok = tiny_llama(), byte_tokenizer()
    cfg = QuantConfig(base="squeezellm", bits=3, outliers=1.0, significant=0.5, calib=str(text), nsamples=2, seqlen=32)
    result = quantize(model, tok, cfg)
    return model, tok, result


@pytest.fixture
def ckpt(quantized, tmp_path) -> Path:
    model, tok, result = quantized
    return save_checkpoint(tmp_path / "ckpt", model, tok, result, dense="fp32")


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
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    layouts = {n: LayerLayout.from_meta(lm, n) for n, lm in cfg["layers"].items()}
    header = read_header(ckpt / "model.safetensors")
    owned = {f"{n}.{s}" for n, lo in layouts.items() for s in lo.tensors()}
    stored = sum(nbytes for name, (_, _, nbytes) in header.items() if name in owned)
    report = json.loads((ckpt / "requant_report.json").read_text())
    assert report["stored_bytes"] == stored and cfg["format_version"] == 2
    rowptr_bytes = sum(4 * (lo.out_features + 1) for lo in layouts.values() if lo.nnz)
    assert 8 * stored == result.bit_count().total_bits + 8 * rowptr_bytes  # widths 64/96: no padding
    assert cfg["bits"] == 3 and cfg["sparse_entries"] == result.bit_count().sparse_entries
    assert set(cfg["layers"]) == set(result.layers)


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
        if path.endswith(ck.WEIGHTS_FILE):
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


W = "model.safetensors"


def _keep_meta(fn):
    """Rewrite model.safetensors with fn applied, keeping (and so not tripping) the recorded hashes."""

    def edit(d: Path) -> None:
        from requant.format.files import file_metadata

        meta = file_metadata(d / W)
        tensors = load_file(str(d / W))
        fn(tensors)
        save_file(tensors, str(d / W), metadata=meta)

    return edit


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (lambda d: (d / W).write_bytes((d / W).read_bytes()[:-100]), r"model\.safetensors.*truncated"),
        (lambda d: (d / W).write_bytes(b"\xff" * 64), r"model\.safetensors.*corrupt header"),
        (
            _keep_meta(lambda t: t.update({f"{Q}.lut": t[f"{Q}.lut"].float()})),
            rf"tensor {Q}\.lut is F32 \[64, 8\], expected F16",
        ),
        (
            _keep_meta(lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:, :-1].contiguous()})),
            rf"tensor {Q}\.weight is U8 \[64, 7, 3\], expected U8 \[64, 8, 3\]",
        ),
        (_keep_meta(lambda t: t.pop(f"{Q}.sparse_col")), rf"tensor {Q}\.sparse_col is missing"),
        (
            _keep_meta(lambda t: t.update({f"{Q}.sparse_rowptr": -t[f"{Q}.sparse_rowptr"]})),
            rf"tensor {Q}\.sparse_rowptr does not match its recorded sha256",
        ),
        (_keep_meta(lambda t: t.pop("model.norm.weight")), r"tensor model\.norm\.weight is missing"),
        (
            _keep_meta(lambda t: t.update({"model.norm.weight": torch.full((64,), 2.0)})),
            r"tensor model\.norm\.weight does not match its recorded sha256",
        ),
        (
            lambda d: _rewrite(d / W, lambda t: None),  # re-saved by a tool that drops the metadata
            r"records no content hashes",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(format_version=99)),
            r"format version 99 is not loadable here",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"]["layers"][Q].update(bits=4)),
            rf"quantization_config\.bits = 3, but layer {Q} is stored with 4 bits",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(bits=4)),
            r"quantization_config\.bits = 4, but layer \S+ is stored with 3 bits",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].update(sparse_entries=1)),
            r"sparse_entries = 1",
        ),
        (
            lambda d: _edit_json(
                d / "config.json", lambda c: c["quantization_config"]["layers"][Q].update(kind_in_block="x")
            ),
            r"written with another layer table than config\.json",
        ),
        (
            lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].pop("layers")),
            r"no 'layers' table",
        ),
    ],
)
def test_corrupt_checkpoints_are_refused_naming_file_and_tensor(ckpt, corrupt, pattern):
    corrupt(ckpt)
    with pytest.raises(CheckpointError, match=pattern):
        load_quantized(ckpt)


def test_a_flipped_code_byte_is_refused_and_loads_with_verify_off(quantized, ckpt):
    from requant.format.files import read_header as header_of

    data = bytearray((ckpt / W).read_bytes())
    n = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + n])
    begin = raw[f"{Q}.weight"]["data_offsets"][0]
    data[8 + n + begin] ^= 0x01
    (ckpt / W).write_bytes(bytes(data))
    assert header_of(ckpt / W)  # the file itself is well-formed: only the hash can tell
    with pytest.raises(CheckpointError, match=rf"tensor {Q}\.weight does not match its recorded sha256"):
        load_quantized(ckpt)
    loaded, _ = load_quantized(ckpt, verify=False)  # the user's explicit choice
    assert isinstance(loaded.get_submodule(Q), QuantLinear)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_loaded(ckpt, tmp_path):
    marker = tmp_path / "executed"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has neither model\.safetensors nor"):
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
    out = save_checkpoint(tmp_path / "r", model, tok, result, dense="fp32")
    loaded, _ = load_quantized(out)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)  # > 4 rows: bit-exact dequantize + BLAS
        step = loaded(ids[:, :1]).logits  # the decode kernel
        torch.testing.assert_close(step, expected[:, :1], rtol=0, atol=1e-3)
    header = read_header(out / "model.safetensors")
    stored = sum(nbytes for name, (_, _, nbytes) in header.items() if name.rpartition(".")[0] in result.layers)
    accounted = result.bit_count().total_bits / 8
    assert accounted <= stored <= 1.02 * accounted
