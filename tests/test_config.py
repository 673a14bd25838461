import dataclasses

import pytest

from requant.config import QuantConfig
from requant.errors import ConfigError


def _with_choices():
    return [f for f in dataclasses.fields(QuantConfig) if f.metadata.get("choices")]


@pytest.mark.parametrize("f", _with_choices(), ids=lambda f: f.name)
def test_every_listed_value_is_accepted_and_others_refused_by_name(f):
    for value in f.metadata["choices"]:
        extra = {"outliers": 1.0, "outlier_select": "adaptive"} if f.name.startswith("alg1") else {}
        if f.name == "base" and value in ("awq", "gptq", "qtip"):
            extra = {}
        QuantConfig(**{**extra, f.name: value})
    with pytest.raises(ConfigError, match=rf"{f.metadata['what']} .*not allowed; use one of"):
        QuantConfig(**{f.name: "not-a-choice" if not isinstance(f.default, int) else 7})


def test_every_setting_has_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(QuantConfig))


def test_dict_round_trip_is_exact_and_unknown_keys_are_refused():
    c = QuantConfig(base="rtn", bits=4, group_size=64, include=("q_proj",), base_options={"x": 1})
    d = c.to_dict()
    assert d["include"] == ["q_proj"]  # JSON-friendly
    assert QuantConfig.from_dict(d) == c
    with pytest.raises(ConfigError, match="unknown config keys: nope"):
        QuantConfig.from_dict({**d, "nope": 1})


def test_differences_name_exactly_the_changed_settings():
    a = QuantConfig()
    assert a.differences(dataclasses.replace(a, bits=4, seed=3)) == ["bits", "seed"]
    assert a.differences(dataclasses.replace(a, bos="never")) == ["bos"]  # a work dir / checkpoint refuses it
    assert a.differences(a) == []
