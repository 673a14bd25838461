import json

import pytest
import torch

from requant.config import QuantConfig
from requant.errors import CheckpointError, InputError
from requant.format import load_checkpoint, save_checkpoint
from requant.pipeline import quantize


@pytest.fixture
def quantized(model, tokenizer, text_file):
    cfg = QuantConfig(
        base="squeezellm", bits=3, outliers=1.0, significant=0.5, calib=str(text_file), nsamples=2, seqlen=32
    )
    result = quantize(model, tokenizer, cfg)
    return model, tokenizer, result


def test_reload_gives_identical_logits_and_weights(quantized, tmp_path):
    model, tok, result = quantized
    out = save_checkpoint(tmp_path / "ckpt", model, tok, result)
    loaded, _, back = load_checkpoint(out)
    ids = torch.randint(0, 256, (2, 20))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, q in result.layers.items():
        assert torch.equal(back.layers[name].weight(), q.weight())
    assert back.bit_count() == result.bit_count()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # ties survive


def test_sparse_entries_restore_original_weights(quantized, model):
    _, _, result = quantized
    for q in result.layers.values():
        m = q.sparse.mask()
        assert q.sparse.nnz > 0
        # masked positions hold the original weight (fp16 residual precision)
        assert (q.weight()[m] - q.sparse.add_to(q.dense.dequantize())[m]).abs().max() == 0


def test_refuses_different_checkpoint_unless_force(quantized, tmp_path):
    model, tok, result = quantized
    out = save_checkpoint(tmp_path / "ckpt", model, tok, result)
    save_checkpoint(out, model, tok, result)  # same config: allowed
    other = type(result)(QuantConfig(base="rtn", bits=4), result.layers, {})
    with pytest.raises(InputError, match="differs in: base, bits"):
        save_checkpoint(out, model, tok, other)
    save_checkpoint(out, model, tok, other, force=True)


def test_failed_write_leaves_nothing(quantized, tmp_path, monkeypatch):
    model, tok, result = quantized
    import requant.format.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "write_json_atomic", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", model, tok, result)
    assert not (tmp_path / "ckpt").exists() and [p.name for p in tmp_path.iterdir()] == ["text.txt"]


def test_corrupt_checkpoints_are_named(quantized, tmp_path):
    model, tok, result = quantized
    out = save_checkpoint(tmp_path / "ckpt", model, tok, result)
    f = out / "quantized.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"quantized\.safetensors.*truncated"):
        load_checkpoint(out)
    f.write_bytes(data)
    meta = json.loads((out / "requant.json").read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["bits"] = 2
    (out / "requant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bits"):
        load_checkpoint(out)
    meta["format_version"] = 99
    (out / "requant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(out)
