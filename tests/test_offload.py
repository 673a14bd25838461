"""Offloaded models (memory-mapped weights + block checkpointing) compute exactly what resident ones do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import requant_config
from requant.errors import ConfigError, InputError
from requant.loading import load_model
from requant.memory import PeakAnon, anon_rss, peak_rss
from requant.model import quantizable_layers
from requant.offload import INDEX, checkpoint_blocks, is_offloaded, load_offloaded, spill
from requant.pipeline import quantize
from requant.sensitivity.gradients import mean_loss_gradient


def _grads(model, windows):
    names = [i.name for i in quantizable_layers(model)]
    return mean_loss_gradient(model, names, windows)


def test_offloaded_model_is_file_backed_and_equal(model_dir, windows, tmp_path):
    ref, _ = load_model(model_dir)
    off, _ = load_model(model_dir, offload=tmp_path / "off")
    assert is_offloaded(off) and not is_offloaded(ref)
    assert off.lm_head.weight is off.model.embed_tokens.weight  # tied again after binding
    with torch.no_grad():
        assert torch.equal(ref(input_ids=windows).logits, off(input_ids=windows).logits)
    # An in-place write to the parameter lands in its file: the tensor is the memory map, not a copy.
    name = "model.layers.1.mlp.down_proj.weight"
    info = json.loads((tmp_path / "off" / INDEX).read_text())[name]
    with torch.no_grad():
        off.get_parameter(name)[3, 5] = 123.0
    on_disk = np.memmap(tmp_path / "off" / f"{name}.dat", dtype=info["dtype"], mode="r", shape=tuple(info["shape"]))
    assert on_disk[3, 5] == 123.0


def test_gradients_equal_with_checkpointed_blocks(model_dir, windows, tmp_path):
    ref, _ = load_model(model_dir)
    off, _ = load_model(model_dir, offload=tmp_path / "off")
    loss_r, g_r = _grads(ref, windows)
    loss_o, g_o = _grads(off, windows)
    assert loss_r == loss_o
    for n in g_r:
        assert torch.equal(g_r[n], g_o[n]), n
    checkpoint_blocks(off)  # idempotent: a second wrap would recompute twice, not change results
    assert _grads(off, windows)[0] == loss_r


def test_folder_rebuilt_on_load(model_dir, windows, tmp_path):
    """Weights a killed run left interpolated in the files must not survive into the next load."""
    ref, _ = load_model(model_dir)
    off, _ = load_model(model_dir, offload=tmp_path / "off")
    with torch.no_grad():
        for p in off.parameters():
            p.mul_(0.5)
    del off
    again, _ = load_model(model_dir, offload=tmp_path / "off")
    with torch.no_grad():
        assert torch.equal(ref(input_ids=windows).logits, again(input_ids=windows).logits)


def test_requant_pipeline_same_result_offloaded(model_dir, tmp_path, text_file):
    """Fisher, Algorithm 1, PQI path writes and the detach loop through the memory maps: identical layers."""
    # Algorithm 1's full candidate grid (8 steps up to 4 × the budget), 4 windows.
    cfg = requant_config(text_file, nsamples=4, alg1_steps=8, alg1_max_factor=4.0)
    results = []
    for off in (None, tmp_path / "off"):
        model, tok = load_model(model_dir, offload=off)
        res = quantize(model, tok, cfg)
        results.append({n: q.weight() for n, q in res.layers.items()})
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_offload_refusals(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="CPU"):
        load_offloaded(str(model_dir), tmp_path / "off", dtype=torch.float32, device="cuda")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(InputError, match="safetensors"):
        load_offloaded(str(bare), tmp_path / "off2", dtype=torch.float32)
    assert not (tmp_path / "off2").exists()  # nothing half-written
    from safetensors.torch import load_file, save_file

    (src,) = model_dir.glob("*.safetensors")
    tensors = load_file(str(src))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bare / "model.safetensors"))
    with pytest.raises(InputError, match=r"no tensor for parameter 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_offloaded(str(bare), tmp_path / "off3", dtype=torch.float32)


def test_memory_probes():
    with PeakAnon(interval=0.01) as p:
        x = torch.ones(8 * 2**20)  # 32 MiB of anonymous memory
        x.add_(1)
    assert p.peak >= anon_rss() - 64 * 2**20 and p.peak > 32 * 2**20
    assert peak_rss() >= p.peak


def test_cli_quantize_offload_same_checkpoint(capsys, model_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    from requant.cli import main

    common = ["--bits", "3", "--outliers", "0.5", "--significant", "0.1", "--calib", str(text_file)]
    common += ["--nsamples", "2", "--seqlen", "32", "--json"]
    outs = []
    for extra in ([], ["--offload", str(tmp_path / "off")]):
        out = tmp_path / f"q{len(outs)}"
        assert main(["quantize", str(model_dir), "-o", str(out), *common, *extra]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["peak_memory"]["rss_gb"] >= rep["peak_memory"]["anon_gb"] > 0
        assert not (tmp_path / "off").exists()  # the weight files go once the checkpoint is written
        outs.append(out)
    a, b = (load_file(next(o.glob("*.safetensors"))) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_spill_is_file_backed_only_when_offloaded(model_dir, tmp_path):
    t = {"a": torch.randn(5, 7), "b": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    ref, _ = load_model(model_dir)
    same = spill(ref, "x", t.items())
    assert all(same[n] is t[n] for n in t)
    off, _ = load_model(model_dir, offload=tmp_path / "off")
    first, second = spill(off, "x", t.items()), spill(off, "x", {"a": torch.zeros(5, 7)}.items())
    assert all(torch.equal(first[n], t[n]) and first[n].data_ptr() != t[n].data_ptr() for n in t)
    assert torch.equal(first["a"], t["a"]) and not second["a"].any()  # a later spill leaves earlier ones alone
    assert len(list((tmp_path / "off" / "spill").iterdir())) == 2
