import json

import pytest
import torch

from requant.config import QuantConfig
from requant.errors import ConfigError
from requant.pipeline import quantize
from requant.quantizers import LayerInputs, QuantizedTensor, make_quantizer
from requant.quantizers.qtip import QTIPQuantizer, TrellisTensor
from requant.quantizers.qtip.hadamard import incoherent_weight, unpack_signs
from requant.quantizers.qtip.quantizer import sequences_to_tiles, tiles_to_sequences
from requant.quantizers.rtn import minmax_quantize


def _layer(m: int = 32, n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(m, n, generator=g)
    x = torch.randn(400, n, generator=g) @ torch.randn(n, n, generator=g)  # correlated inputs
    return w, LayerInputs(hessian=x.T @ x, tokens=400)


def _proxy(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (q - w).double()
    return float(torch.trace(d @ h.double() @ d.T) / torch.trace(w.double() @ h.double() @ w.double().T))


def test_tile_layout_round_trip():
    x = torch.arange(32 * 48).view(32, 48)
    s = tiles_to_sequences(x, (4, 8))
    assert s.shape == (48, 32) and torch.equal(s[1], x[4:8, 0:8].reshape(-1))  # tile (1, 0)
    assert torch.equal(sequences_to_tiles(s, (32, 48), (4, 8)), x)


def test_fit_stores_exact_bits_and_decodes_its_own_codes():
    w, inputs = _layer()
    q = QTIPQuantizer(2, L=8).fit(w, inputs=inputs)
    assert isinstance(q, TrellisTensor) and q.shape == (32, 48)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 4 and q.scale.dtype == torch.float16
    # K·T bits per tail-biting stream, + 1 bit per RHT sign + one fp16 scale
    assert q.bit_count().total_bits == 2 * 32 * 48 + 8 * (4 + 6) + 16
    dq = q.dequantize()
    assert dq.dtype == torch.float32 and dq.shape == w.shape
    s_out, s_in = unpack_signs(q.sign_out, 32), unpack_signs(q.sign_in, 48)
    assert torch.allclose(
        incoherent_weight(dq.double(), s_out.double(), s_in.double()).float(), q.transformed(), atol=1e-6
    )
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(q.linear(x), x @ dq.T, atol=1e-5)


def test_stored_codes_decode_to_what_the_search_reported(monkeypatch):
    from requant.quantizers.qtip import quantizer as mod

    reported = []

    def spy(x, trellis, **kw):
        res = mod_quantize_sequences(x, trellis, **kw)
        reported.append(res.recon.clone())
        return res

    mod_quantize_sequences = mod.quantize_sequences
    monkeypatch.setattr(mod, "quantize_sequences", spy)
    w, inputs = _layer(seed=6)
    q = QTIPQuantizer(3, L=8, tile=(8, 4)).fit(w, inputs=inputs)
    blocks = [r.reshape(32, 4) for r in reported]  # one call per 4-column block, tiles of 8 rows
    assert len(blocks) == 12
    assert torch.allclose(torch.cat(blocks, 1) * q.scale.float(), q.transformed(), rtol=1e-6, atol=0)


def test_hessian_feedback_and_more_bits_lower_the_proxy_loss():
    w, inputs = _layer(seed=1)
    h = inputs.hessian
    err = {b: _proxy(w, QTIPQuantizer(b, L=8).fit(w, inputs=inputs).dequantize(), h) for b in (2, 3, 4)}
    assert err[2] > err[3] > err[4]
    no_h = _proxy(w, QTIPQuantizer(2, L=8).fit(w).dequantize(), h)
    assert err[2] < 0.85 * no_h
    rtn = _proxy(w, minmax_quantize(w, 2, 48).dequantize(), h)
    assert err[2] < 0.5 * rtn


def test_state_round_trip_and_determinism():
    w, inputs = _layer(seed=2)
    q = QTIPQuantizer(3, L=9, V=1, code="3inst", tile=(8, 16), seed=5).fit(w, inputs=inputs)
    meta, tensors = q.to_state()
    json.dumps(meta)
    back = QuantizedTensor.from_state(json.loads(json.dumps(meta)), tensors)
    assert isinstance(back, TrellisTensor) and back.tile == (8, 16) and back.code == "3inst"
    assert torch.equal(back.dequantize(), q.dequantize())
    again = QTIPQuantizer(3, L=9, V=1, code="3inst", tile=(8, 16), seed=5).fit(w, inputs=inputs)
    assert torch.equal(again.codes, q.codes)


def test_objective_is_the_layer_output_error_on_kept_entries():
    w, inputs = _layer(seed=8)
    quantizer = QTIPQuantizer(2, L=8)
    recon = quantizer.fit(w, inputs=inputs).dequantize()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.1
    d = ((w - recon) * keep).double()
    expected = torch.diagonal(d @ inputs.hessian.double() @ d.T)
    assert torch.allclose(quantizer.objective(w, recon, keep, inputs), expected, rtol=1e-5)
    assert quantizer.objective(w, recon, keep, None) is None


def test_v2_trellis_fits():
    w, inputs = _layer(seed=3)
    q = QTIPQuantizer(2, L=8, V=2).fit(w, inputs=inputs)
    assert q.V == 2 and _proxy(w, q.dequantize(), inputs.hessian) < 0.25


def test_excluded_entries_are_removed_before_the_transform():
    w, inputs = _layer(seed=4)
    ex = torch.zeros_like(w, dtype=torch.bool)
    ex[3, 7] = ex[10, 0] = True
    big = w.clone()
    big[ex] = 50.0
    zeroed = w.masked_fill(ex, 0.0)
    qz = QTIPQuantizer(2, L=8).fit(zeroed, inputs=inputs)
    qb = QTIPQuantizer(2, L=8).fit(big, exclude=ex, inputs=inputs)
    assert torch.equal(qb.codes, qz.codes) and torch.equal(qb.scale, qz.scale)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="bits 8"):
        QTIPQuantizer(8)
    with pytest.raises(ConfigError, match="group-size"):
        QTIPQuantizer(2, 64)
    with pytest.raises(ConfigError, match="L=20"):
        QTIPQuantizer(2, L=20)
    with pytest.raises(ConfigError, match="code"):
        QTIPQuantizer(2, code="hyb")
    with pytest.raises(ConfigError, match=r"layer model\.x"):
        QTIPQuantizer(2).check_shape("model.x", (40, 48))
    with pytest.raises(ConfigError, match="40x48"):
        QTIPQuantizer(2).fit(torch.zeros(40, 48))


def test_registered_base_quantizes_a_tiny_model_end_to_end(tokenizer, text_file):
    from helpers import tiny_llama
    from requant.data import text_windows

    assert isinstance(make_quantizer("qtip", 2, L=8), QTIPQuantizer)
    # Scored on text like the calibration text (other windows): the Hessian describes those inputs.
    held_out = text_windows(tokenizer, str(text_file), 24, nsamples=2, seed=5)
    with torch.no_grad():
        ref = tiny_llama()(held_out).logits
    logit_err = {}
    for base, options in (("qtip", {"L": 6, "tile": (4, 8)}), ("rtn", {})):
        m = tiny_llama()
        cfg = QuantConfig(base=base, bits=2, calib=str(text_file), nsamples=2, seqlen=32, base_options=options)
        r = quantize(m, tokenizer, cfg)
        with torch.no_grad():
            logit_err[base] = float((m(held_out).logits - ref).square().mean())
        if base == "qtip":
            assert all(isinstance(q.dense, TrellisTensor) for q in r.layers.values())
            assert 2.0 < r.bit_count().bits_per_weight < 2.1
            for name, q in r.layers.items():
                assert torch.equal(m.get_submodule(name).weight, q.weight())
    assert logit_err["qtip"] < 0.5 * logit_err["rtn"]
