import json

from requant.config import QuantConfig
from requant.cost import estimate_cost, model_info


def _info(**over):
    info = {
        "params": 1000,
        "linear_params": 900,
        "quantized_params": 800,
        "layers": 7,
        "blocks": 2,
        "hidden": 16,
        "intermediate": 32,
        "vocab": 50,
        "input_stat_floats": 2000,
        "input_stat_floats_block": 1000,
        "dtype_bytes": 4,
    }
    info.update(over)
    return info


def test_estimate_cost_counts_passes_flops_and_memory():
    # ReQuant on SqueezeLLM: Fisher (32 windows) + PQI before each of 2 detach steps (8 nodes × 10 windows).
    config = QuantConfig(significant=0.5, significant_select="pqi", step=0.25, pqi_nodes=8, pqi_nsamples=10)
    one = estimate_cost(config, _info(), world_size=1)
    assert one["estimate"] is True and one["pqi_passes"] == 2
    assert one["passes"] == {
        "fisher_fwd_bwd": 32,
        "pqi_fwd_bwd": 160,
        "calibration_fwd": 0,
        "fwd_bwd": 192,
        "fwd": 0,
    }
    attn = 2 * 2 * 512 * 16
    per_token = 4 * 900 + 2 * 800 + 3 * attn
    assert one["flops"]["fwd_bwd_per_token"] == per_token
    assert one["flops"]["total"] == 192 * per_token * 512
    two = estimate_cost(config, _info(), world_size=3)
    # Each sum is split on its own: ceil(32/3) + 2 · 8 · ceil(10/3).
    assert two["per_rank_passes"] == {"fwd_bwd": 11 + 2 * 8 * 4, "fwd": 0}
    assert two["flops"]["total"] == one["flops"]["total"] and two["flops"]["per_rank"] < one["flops"]["total"] / 2
    mem = one["memory_bytes_per_rank"]
    # The detach holds w, the reconstruction and the node's sums (fp32), 4 boolean masks and the codes (1 byte).
    assert mem["weights"] == 4000 and mem["gradient_work"] == 4 * 800 * 3 + 4 * 800 + 800
    assert mem["input_statistics"] == 0 and mem["device_peak"] == 0
    assert mem["peak"] == mem["runtime"] + mem["weights"] + mem["gradient_work"] + mem["activations"]
    fisher_only = estimate_cost(QuantConfig(), _info())["memory_bytes_per_rank"]
    assert fisher_only["gradient_work"] == 4 * 800 * 2 + 800 and fisher_only["peak"] < mem["peak"]


def test_estimate_cost_with_offload():
    config = QuantConfig(significant=0.5, significant_select="pqi", step=0.25, pqi_nodes=8, pqi_nsamples=10)
    plain = estimate_cost(config, _info())
    off = estimate_cost(config, _info(), offload=True)
    assert off["offload"] and off["passes"] == plain["passes"]
    fwd_token = 2 * 900 + 2 * 2 * 512 * 16
    assert off["flops"]["fwd_bwd_per_token"] == plain["flops"]["fwd_bwd_per_token"] + fwd_token  # recompute
    m, p = off["memory_bytes_per_rank"], plain["memory_bytes_per_rank"]
    assert m["weights"] == 0 and m["file_backed_weights"] == p["weights"] == 4000
    # masters, sums and the reconstruction are memory-mapped: only the masks and codes stay in the process
    assert m["activations"] < p["activations"] and m["gradient_work"] == 4 * 800 + 800
    assert m["peak"] == m["runtime"] + m["gradient_work"] + m["activations"]


def test_estimate_cost_on_an_accelerator_splits_device_and_host():
    config = QuantConfig(significant=0.5, significant_select="pqi", step=0.25, pqi_nodes=8, pqi_nsamples=10)
    cpu = estimate_cost(config, _info())["memory_bytes_per_rank"]
    gpu = estimate_cost(config, _info(), device="cuda")["memory_bytes_per_rank"]
    # the device holds the model, the node's sums and the activations; the host w, the reconstruction, masks, codes
    assert gpu["device_peak"] == 4000 + 4 * 800 + gpu["activations"]
    assert gpu["peak"] == gpu["runtime"] + 4 * 800 * 2 + 4 * 800 + 800
    assert gpu["device_peak"] + gpu["peak"] == cpu["peak"]


def test_estimate_cost_calibration_passes_for_input_methods():
    gptq = estimate_cost(QuantConfig(base="gptq", nsamples=16), _info(), world_size=2)
    assert gptq["passes"]["fisher_fwd_bwd"] == 0 and gptq["passes"]["calibration_fwd"] == 16
    assert gptq["per_rank_passes"] == {"fwd_bwd": 0, "fwd": 8}
    awq = estimate_cost(QuantConfig(base="awq", nsamples=16), _info(), world_size=1)
    assert awq["memory_bytes_per_rank"]["input_statistics"] == 4 * 2000
    rtn = estimate_cost(QuantConfig(base="rtn"), _info())
    assert rtn["passes"]["fwd_bwd"] == 0 and rtn["passes"]["fwd"] == 0 and rtn["flops"]["total"] == 0


def test_model_info_from_meta_model(model):
    info = model_info(model, QuantConfig())
    assert info["layers"] == 14 and info["blocks"] == 2 and info["hidden"] == 64 and info["vocab"] == 257
    assert info["quantized_params"] == sum(
        p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2
    )


def test_dry_run_prints_estimate_and_writes_nothing(capsys, model_dir, tmp_path):
    from requant.cli import main

    out = tmp_path / "q"
    dry = ["quantize", str(model_dir), "-o", str(out), "--dry-run", "--seqlen", "64"]  # the tiny model's context: 256
    assert main([*dry, "--nproc", "2", "--nsamples", "4"]) == 0
    text = capsys.readouterr().out
    assert "ESTIMATED" in text and "4 forward+backward passes" in text and "per rank" in text
    assert not out.exists() and not out.with_name("q.work").exists()
    assert main([*dry, "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert cost["passes"]["fisher_fwd_bwd"] == 32 and cost["world_size"] == 1
    assert main([*dry, "--offload", str(tmp_path / "off")]) == 0
    assert "memory-mapped from disk" in capsys.readouterr().out and not (tmp_path / "off").exists()


def test_estimate_cost_of_the_options_after_the_selection():
    """Fitted sparse values read the fp model's statistics once (a pass and their memory); a detach refit of
    SqueezeLLM keeps its Fisher through the detach (one more fp32 copy); a sequential base's width plan reads
    the one-pass statistics too."""
    base = QuantConfig(significant=0.5, significant_select="pqi")
    plain, fit = (estimate_cost(c, _info()) for c in (base, QuantConfig(**{**base.to_dict(), "sparse_values": "fit"})))
    assert plain["passes"]["calibration_fwd"] == 0 and fit["passes"]["calibration_fwd"] == base.nsamples
    assert fit["memory_bytes_per_rank"]["input_statistics"] == 4 * 2000
    refit = estimate_cost(QuantConfig(**{**base.to_dict(), "detach_refit": True}), _info())
    assert refit["memory_bytes_per_rank"]["gradient_work"] - plain["memory_bytes_per_rank"]["gradient_work"] == 4 * 800
    fb = {"base_options": {"feedback": True}}
    seq, widen = (estimate_cost(QuantConfig(**fb, widen_bits=w), _info()) for w in (0.0, 0.2))
    assert widen["passes"]["calibration_fwd"] == seq["passes"]["calibration_fwd"] + 32
