import pytest
import torch

from requant.errors import ConfigError
from requant.quantizers import QuantizedTensor, RTNQuantizer, make_quantizer
from requant.quantizers.rtn import minmax_quantize


def _w(out=16, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
def test_asym_error_within_half_step(bits, group):
    w = _w()
    q = minmax_quantize(w, bits, group)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    err = (q.dequantize() - w).view(16, 64 // group, group).abs()
    step = q.scale.float()[..., None]
    assert (err <= step / 2 + 1e-6).all()
    # the extremes of each group are on the grid up to fp16 rounding of the scale
    assert torch.allclose(
        q.dequantize().view(16, -1, group).amax(-1),
        w.view(16, -1, group).amax(-1),
        atol=float(step.max()) / 2,
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sym_grid_is_centred(bits):
    w = _w()
    q = minmax_quantize(w, bits, 64, sym=True)
    assert q.zero is None
    levels = torch.unique((q.dequantize() / q.scale.float()).round())
    assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1


def test_excluded_entries_do_not_set_the_range():
    w = _w()
    w[3, 5] = 100.0
    exclude = torch.zeros_like(w, dtype=torch.bool)
    exclude[3, 5] = True
    with_ex = minmax_quantize(w, 3, 64, exclude=exclude)
    clean = w.clone()
    clean[3, 5] = w[3].masked_fill(exclude[3], 0).max()  # a value inside the row's range changes nothing
    ref = minmax_quantize(clean, 3, 64)
    assert torch.equal(with_ex.scale, ref.scale) and torch.equal(with_ex.zero, ref.zero)


def test_constant_groups_are_exact():
    w = torch.tensor([[0.5] * 8, [-0.25] * 8, [0.0] * 8])
    q = minmax_quantize(w, 2, 8)
    # on the grid up to the fp16 rounding of the scale
    assert torch.allclose(q.dequantize(), w, rtol=1e-3, atol=0)


def test_state_round_trip_is_exact():
    q = RTNQuantizer(3, 32).fit(_w())
    meta, tensors = q.to_state()
    back = QuantizedTensor.from_state(meta, tensors)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="bits 5"):
        make_quantizer("rtn", 5)
    with pytest.raises(ConfigError, match="base method 'nope'"):
        make_quantizer("nope", 4)
    with pytest.raises(ConfigError, match="rtn has no option 'grid'; its options are sym"):
        make_quantizer("rtn", 4, grid="lut")
    assert make_quantizer("rtn", 4, sym=True).sym
    with pytest.raises(ConfigError, match="does not divide the input width 576 of layer x"):
        RTNQuantizer(3, 128).check_shape("x", (10, 576))
