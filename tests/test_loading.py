"""requant.loading refuses windows beyond the model's context and a requant checkpoint where a plain model is needed."""

from __future__ import annotations

import json
import shutil

import pytest

from requant.errors import InputError


def test_check_seqlen_reads_the_context_without_loading(model_dir, model, tmp_path):
    from requant.errors import ConfigError
    from requant.loading import check_seqlen, max_context

    assert max_context(model_dir) == 256
    check_seqlen(model_dir, 256)
    with pytest.raises(ConfigError, match="--seqlen 257 is longer than the model's context of 256 tokens"):
        check_seqlen(model_dir, 257)
    with pytest.raises(ConfigError, match="longer than the model's context of 256"):
        check_seqlen(None, 300, model=model)  # a loaded model (library callers)
    (tmp_path / "noctx").mkdir()
    (tmp_path / "noctx" / "config.json").write_text('{"model_type": "x"}')
    assert max_context(tmp_path / "noctx") is None
    check_seqlen(tmp_path / "noctx", 10**6)  # a config that states no context: nothing to check


def test_a_requant_checkpoint_is_refused_as_a_plain_model(model_dir, tmp_path):
    from requant.loading import load_model, resolve_model_path

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "requant", "bits": 3}  # as config.json says, no requant.json
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"is a requant checkpoint \(already quantized\).*requant export --dequantize"):
        load_model(ckpt)
    (ckpt / "requant.json").write_text(json.dumps({"metadata": {"model": "/src/model"}}))
    with pytest.raises(InputError, match="quantize its source model '/src/model' instead"):
        resolve_model_path(ckpt)
    cfg["quantization_config"] = {"quant_method": "gptq"}  # another method's checkpoint is transformers' business
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "requant.json").unlink()
    assert resolve_model_path(ckpt) == str(ckpt)
