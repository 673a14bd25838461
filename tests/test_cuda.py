"""The pipeline on a GPU gives what it gives on the CPU (skipped where there is no CUDA device).

Quantizers run on CPU copies in both cases; only the loss/gradient passes move to the device, so the checks
are: sums over windows agree to fp32 rounding, decisions made from them agree, loaded checkpoints compute
the same logits on either device.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from requant.config import QuantConfig
from requant.data import text_windows
from requant.eval import evaluate
from requant.format import save_checkpoint
from requant.format.loader import load_checkpoint
from requant.pipeline import quantize
from requant.sensitivity import fisher_information, post_quantization_integral

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fisher_and_pqi_match_cpu(tokenizer, text_file):
    windows = text_windows(tokenizer, str(text_file), 32, nsamples=3, seed=0)
    cpu = tiny_llama()
    gpu = tiny_llama().cuda()
    names = [n for n, m in cpu.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    f_cpu = fisher_information(cpu, names, windows)
    f_gpu = fisher_information(gpu, names, windows.cuda())
    assert max(_rel(f_gpu[n].cpu(), f_cpu[n]) for n in names) < 1e-4
    original = {n: cpu.get_submodule(n).weight.detach().clone() for n in names}
    quantized = {n: (w * 4).round() / 4 for n, w in original.items()}
    p_cpu = post_quantization_integral(cpu, names, original, quantized, windows, nodes=2, rule="gauss")
    p_gpu = post_quantization_integral(gpu, names, original, quantized, windows.cuda(), nodes=2, rule="gauss")
    assert abs(p_gpu.predicted - p_cpu.predicted) <= 1e-4 * abs(p_cpu.predicted)
    assert max(_rel(p_gpu.scores[n].cpu(), p_cpu.scores[n]) for n in names) < 1e-4
    assert all(torch.equal(gpu.get_submodule(n).weight.cpu(), original[n]) for n in names)


@pytest.mark.parametrize(
    "kw",
    [
        dict(base="rtn", bits=3, group_size=32),
        dict(base="squeezellm", bits=3, outliers=0.45, significant=0.05),
        dict(
            base="squeezellm",
            bits=3,
            outliers=0.45,
            outlier_select="adaptive",
            significant=0.1,
            significant_select="pqi",
            step=0.05,
            pqi_nodes=2,
            pqi_rule="gauss",
        ),
        dict(base="gptq", bits=3, group_size=32),
        dict(base="awq", bits=3, group_size=32),
    ],
    ids=["rtn", "squeezellm-dns", "squeezellm-requant", "gptq", "awq"],
)
def test_quantize_on_gpu_matches_cpu(kw, tokenizer, text_file, tmp_path):
    cfg = QuantConfig(calib=str(text_file), nsamples=4, seqlen=32, **kw)
    cpu = tiny_llama()
    gpu = tiny_llama().cuda()
    r_cpu = quantize(cpu, tokenizer, cfg)
    r_gpu = quantize(gpu, tokenizer, cfg)
    assert r_gpu.bit_count().bits_per_weight == r_cpu.bit_count().bits_per_weight
    windows = text_windows(tokenizer, str(text_file), 32, limit=6)
    ppl_cpu = evaluate(cpu, windows).perplexity
    ppl_gpu = evaluate(gpu, windows.cuda()).perplexity
    # Gradient sums differ in the last bits, so a few entries near a decision boundary may flip.
    assert abs(ppl_gpu - ppl_cpu) <= 0.01 * ppl_cpu
    agree = [(r_gpu.layers[n].weight().cpu() == r_cpu.layers[n].weight()).float().mean().item() for n in r_cpu.layers]
    assert min(agree) > 0.97
    save_checkpoint(tmp_path / "q", gpu.cpu(), tokenizer, r_gpu)
    m_cpu, _, _ = load_checkpoint(tmp_path / "q")
    m_gpu, _, _ = load_checkpoint(tmp_path / "q", device="cuda")
    x = windows[:2]
    with torch.no_grad():
        a = m_cpu(x).logits
        b = m_gpu(x.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
