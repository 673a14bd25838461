"""The straight path w + t·Δw: exact ends, only the subset moves, and the model gets w back, also on error."""

import pytest
import torch

from requant.errors import ConfigError, NumericalError
from requant.model import quantizable_layers
from requant.sensitivity.path import check_path, weight_delta, weights_on_path


def _weights(model):
    return {n: model.get_submodule(n).weight for n in (i.name for i in quantizable_layers(model))}


def test_delta_is_quantized_minus_original_in_fp32(path):
    names, original, quantized = path
    d = weight_delta(original, quantized, names)
    assert all(d[n].dtype == torch.float32 and torch.equal(d[n], quantized[n] - original[n]) for n in names)


def test_path_ends_are_exact_and_midpoints_interpolate(model, path):
    names, original, quantized = path
    params = _weights(model)
    with weights_on_path(model, names, original, quantized) as set_point:
        set_point(1.0)
        assert all(torch.equal(params[n], quantized[n]) for n in names)  # w̃ bit for bit
        set_point(0.5)
        assert all(torch.allclose(params[n], (original[n] + quantized[n]) / 2, atol=1e-7) for n in names)
        set_point(1.0, subset=names[:1])
        assert torch.equal(params[names[0]], quantized[names[0]])
        assert all(torch.equal(params[n], original[n]) for n in names[1:])  # the others stay at w
    assert all(torch.equal(params[n], original[n]) for n in names)


def test_the_model_gets_w_back_after_an_error(model, path):
    names, original, quantized = path
    params = _weights(model)
    with pytest.raises(RuntimeError, match="stop"), weights_on_path(model, names, original, quantized) as set_point:
        set_point(0.7)
        raise RuntimeError("stop")
    assert all(torch.equal(params[n], original[n]) for n in names)


def test_bad_paths_are_refused_by_name(model, path):
    names, original, quantized = path
    with pytest.raises(ConfigError, match="list of layer names is empty"):
        check_path(model, [], original, quantized)
    with pytest.raises(ConfigError, match="not a module of the model"):
        check_path(model, ["nope"], original, quantized)
    with pytest.raises(ConfigError, match=f"quantized weights have no entry for layer {names[0]!r}"):
        check_path(model, names, original, {})
    bad = {**quantized, names[0]: quantized[names[0]][:, :-1]}
    with pytest.raises(ConfigError, match="has shape"):
        check_path(model, names, original, bad)
    nan = {**quantized, names[0]: quantized[names[0]].clone().fill_(float("nan"))}
    with pytest.raises(NumericalError, match="contains NaN or Inf"):
        check_path(model, names, original, nan)
    with pytest.raises(ConfigError, match="are not among the path's layers"):
        check_path(model, names, original, quantized, subset=["nope"])
