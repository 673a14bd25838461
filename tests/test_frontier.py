"""benchmarks/frontier.py's pure parts: the Pareto front, matching stored rows by config, and that the shipped
table `--recipe best` reads is what the frontier's results hold."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import frontier  # noqa: E402

from requant.config import QuantConfig  # noqa: E402
from requant.recipes import BEST_TABLE, BEST_TEXTS, best_point  # noqa: E402


def test_pareto_keeps_the_points_nothing_beats_at_fewer_bits():
    pts = [
        {"name": "a", "bits_per_weight": 2.0, "wiki:test": 40.0},
        {"name": "b", "bits_per_weight": 3.0, "wiki:test": 45.0},  # more bits, worse: off the front
        {"name": "c", "bits_per_weight": 3.0, "wiki:test": 25.0},
        {"name": "d", "bits_per_weight": 3.5, "wiki:test": 25.0},  # equal at more bits: off
        {"name": "e", "bits_per_weight": 4.0, "wiki:test": 22.0},
        {"name": "f", "bits_per_weight": 1.0},  # not measured on this text
    ]
    assert frontier.pareto(pts, "wiki:test") == ["a", "c", "e"]


def test_config_keys_ignore_settings_without_effect():
    dns = QuantConfig(outliers=0.45, outlier_select="iqr", significant=0.05, significant_select="fisher")
    # A D&S run stored when the recipe used other PQI settings is the same configuration ...
    assert frontier._key(dns) == frontier._key(QuantConfig(**{**dns.to_dict(), "pqi_rule": "gauss", "pqi_nodes": 2}))
    # ... but not once the detach ranks by PQI, nor with another outlier rule or another seed.
    pqi = QuantConfig(**{**dns.to_dict(), "significant_select": "pqi"})
    assert frontier._key(pqi) != frontier._key(QuantConfig(**{**pqi.to_dict(), "pqi_rule": "gauss"}))
    assert frontier._key(dns) != frontier._key(QuantConfig(**{**dns.to_dict(), "outlier_select": "adaptive"}))
    assert frontier._key(dns) != frontier._key(QuantConfig(**{**dns.to_dict(), "seed": 1}))


def test_grid_configs_are_valid_and_named_once():
    grid = frontier.grid()
    keys = [frontier._key(c) for c in grid.values()]
    assert len(set(keys)) == len(keys)  # no two names for one configuration
    assert {c.bits for c in grid.values()} == {2, 3, 4} and {c.base for c in grid.values()} >= {
        "rtn", "awq", "gptq", "squeezellm", "qtip"
    }  # fmt: skip


def test_shipped_table_is_the_frontier_results():
    res = json.loads((ROOT / "benchmarks" / "results" / "frontier.json").read_text())
    table = json.loads(BEST_TABLE.read_text())
    both = [p for p in res["points"] if all(t in p for t in BEST_TEXTS)]
    assert [p["name"] for p in table["points"]] == [p["name"] for p in both]
    for b in res["best"]:
        assert best_point(table["points"], b["budget"])["name"] == b["name"]
