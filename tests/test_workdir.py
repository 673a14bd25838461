"""The work directory: a stage is computed once, stored, and read back bit for bit on resume."""

import pytest
import torch

from requant.config import QuantConfig
from requant.errors import InputError
from requant.quantizers import make_quantizer
from requant.workdir import DENSE, META, TENSORS, WorkDir, decode_masks, encode_masks


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_a_stage_is_computed_once_and_resumed_exactly(tmp_path):
    cfg = QuantConfig()
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5)}
    meta = {"counts": {"a": 3}, "report": {"objective": 0.1 + 0.2}}
    q = make_quantizer("squeezellm", 3)
    dense = {"l": q.fit(torch.randn(8, 16, generator=g))}
    work = WorkDir(tmp_path / "w", cfg)
    for stage, value, codec in (("t", tensors, TENSORS), ("m", meta, META), ("d", dense, DENSE)):
        compute, calls = _counting(value)
        assert work.cached(stage, compute, codec) is value and calls == [1]
    again = WorkDir(tmp_path / "w", cfg, resume=True)
    never = _counting(None)[0]
    t = again.cached("t", never, TENSORS)
    assert t.keys() == tensors.keys() and all(torch.equal(t[k], tensors[k]) for k in t)
    assert again.cached("m", never, META) == meta
    d = again.cached("d", never, DENSE)
    assert torch.equal(d["l"].dequantize(), dense["l"].dequantize())
    assert again.resumed == ["t", "m", "d"]


def test_without_a_path_nothing_is_stored_and_every_call_computes():
    work = WorkDir(None, QuantConfig())
    compute, calls = _counting({"x": torch.ones(2)})
    work.cached("t", compute, TENSORS)
    work.cached("t", compute, TENSORS)
    assert calls == [1, 1] and work.stored("t") is None and not work.has("t")


def test_a_stage_without_its_sidecar_does_not_exist(tmp_path):
    work = WorkDir(tmp_path / "w", QuantConfig())
    work.save("s", {"x": torch.ones(2)}, {"k": 1})
    assert work.has("s")
    (tmp_path / "w" / "s.json").unlink()  # as if killed between the two writes
    assert not work.has("s") and work.stored("s") is None


def test_masks_round_trip_through_their_indices():
    g = torch.Generator().manual_seed(1)
    masks = {"a": torch.rand(5, 7, generator=g) < 0.3, "b": torch.zeros(2, 3, dtype=torch.bool)}
    back = decode_masks(encode_masks(masks), {"a": (5, 7), "b": (2, 3)})
    assert all(torch.equal(back[n], masks[n]) for n in masks)


def test_resume_with_other_settings_or_weights_is_refused_by_name(tmp_path):
    WorkDir(tmp_path / "w", QuantConfig(), fingerprint={"weights": "1"})
    with pytest.raises(InputError, match=r"different settings \(bits\)"):
        WorkDir(tmp_path / "w", QuantConfig(bits=4), resume=True, fingerprint={"weights": "1"})
    with pytest.raises(InputError, match=r"different settings \(weights\)"):
        WorkDir(tmp_path / "w", QuantConfig(), resume=True, fingerprint={"weights": "2"})
    with pytest.raises(InputError, match=r"different settings \(bos\)"):  # other calibration windows
        WorkDir(tmp_path / "w", QuantConfig(bos="always"), resume=True, fingerprint={"weights": "1"})
    fresh = WorkDir(tmp_path / "w", QuantConfig(bits=4))  # without --resume: start over
    assert fresh.stored("anything") is None
