"""Named presets: the paper's settings per base method (its Table 10; docs/method.md), overridable flag by flag."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .accounting import SPARSE_ENTRY_BITS
from .config import EQUAL_BITS
from .errors import ConfigError

# ReQuant per base method. The detach ranks entries by Δw ⊙ ∇F(w̃), the right rule with one node: what restoring
# an entry gains from where the model now is. On the reference setting it beats the path-averaged PQI of 2 Gauss
# nodes at 3 and 4 bits, with half the gradient passes (docs/results.md; measured with SqueezeLLM, RTN shares
# its settings); `--pqi-rule gauss --pqi-nodes 2` is the paper's reading (2 Gauss nodes estimate ΔF within 0.7%,
# like the paper's 32 midpoint nodes).
_REQUANT_DNS = {
    "outliers": 0.45,
    "outlier_select": "adaptive",
    "significant": 0.05,
    "significant_select": "pqi",
    "step": 0.025,
    "pqi_nodes": 1,
    "pqi_rule": "right",
}
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "requant": {
        "squeezellm": _REQUANT_DNS,
        "rtn": _REQUANT_DNS,
        # The paper's AWQ+ReQuant is at g256 so its bits equal AWQ's g128; without --group-size the pipeline
        # picks the group size that keeps that equality on the model's widths (equal_bits_group_size).
        "awq": {"outliers": 0.25, "outlier_select": "adaptive", "significant": 0.0, "group_size": EQUAL_BITS},
        "gptq": {"outliers": 0.25, "outlier_select": "adaptive", "significant": 0.0, "group_size": EQUAL_BITS},
        "qtip": {
            "outliers": 0.0,
            "significant": 0.5,
            "significant_select": "pqi",
            "step": 0.25,
            "pqi_nodes": 2,
            "pqi_rule": "gauss",
        },
    },
    # SqueezeLLM's own Dense-and-Sparse: 0.45% IQR outliers + 0.05% Fisher-sensitive values.
    "dns": {
        b: {"outliers": 0.45, "outlier_select": "iqr", "significant": 0.05, "significant_select": "fisher"}
        for b in ("squeezellm", "rtn")
    },
}


# Per-width changes to a recipe, (recipe, base, bits) -> settings. At 2 bits w̃ is far from w (SqueezeLLM dense-only
# perplexity ~2,400 on R) and the path-averaged PQI ranks better than the gradient at w̃ (docs/results.md).
_PAPER_PQI = {"pqi_nodes": 2, "pqi_rule": "gauss"}
WIDTH_CHANGES: dict[tuple[str, str, int], dict[str, Any]] = {
    ("requant", "squeezellm", 2): _PAPER_PQI,
    ("requant", "rtn", 2): _PAPER_PQI,
}


# `--recipe best --bits-budget B`: the best configuration of a measured table at most B bits per weight
# (benchmarks/frontier.py writes the table: points measured on the reference model, with their configs).
BEST = "best"
BEST_TABLE = Path(__file__).with_name("frontier.json")
BEST_TEXTS = ("wiki:test", "c4")  # a point is ranked by its mean log-perplexity over these texts
# What a table point fixes: how to quantize; not what to calibrate on or which layers (the user's flags keep those).
BEST_SETTINGS = (
    "base", "bits", "widen_bits", "group_size", "sym", "outliers", "outlier_select", "significant",
    "significant_select", "step", "pqi_nodes", "pqi_rule", "alg1_objective", "alg1_criterion", "alg1_granularity",
    "alg1_steps", "alg1_max_factor", "alg1_allocator", "detach_scope", "detach_ranking", "detach_refit",
    "sparse_values", "base_options",
)  # fmt: skip

# The settings some recipe sets: their CLI flags default to "unset" so a recipe can fill them.
RECIPE_SETTINGS = tuple(
    sorted(
        {k for per_base in RECIPES.values() for s in per_base.values() for k in s}
        | {k for s in WIDTH_CHANGES.values() for k in s}
        | set(BEST_SETTINGS)
    )
)


def best_point(
    points: Sequence[dict[str, Any]], budget: float, *, base: str | None = None, bits: int | None = None
) -> dict[str, Any] | None:
    """The point with the lowest mean log-perplexity over BEST_TEXTS among those at ≤ `budget` bits per weight
    (of `base` / `bits` where given); None if there is none."""
    fits = [
        p
        for p in points
        if p["bits_per_weight"] <= budget + 1e-9 and base in (None, p["base"]) and bits in (None, p["bits"])
    ]
    return min(fits, key=lambda p: sum(math.log(p[t]) for t in BEST_TEXTS), default=None)


def best_table(path: Path = BEST_TABLE) -> dict[str, Any]:
    """The measured table `--recipe best` picks from."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"the measured table of --recipe best ({path}) cannot be read: {e}") from None


def best_settings(
    budget: float | None, *, base: str | None = None, bits: int | None = None, path: Path = BEST_TABLE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, point): the quantization settings of the best measured point at ≤ `budget` bits per weight."""
    if budget is None:
        raise ConfigError("--recipe best needs --bits-budget B (bits per quantized weight, e.g. 3.5)")
    table = best_table(path)
    point = best_point(table["points"], budget, base=base, bits=bits)
    if point is None:
        pts = [p for p in table["points"] if base in (None, p["base"]) and bits in (None, p["bits"])]
        which = " ".join(f"--{k} {v}" for k, v in (("base", base), ("bits", bits)) if v is not None)
        if not pts:
            raise ConfigError(f"the measured table of --recipe best has no point with {which}")
        low = min(p["bits_per_weight"] for p in pts)
        raise ConfigError(
            f"--bits-budget {budget:g} is below every measured configuration{' with ' + which if which else ''}; "
            f"allowed: ≥ {math.ceil(low * 1000) / 1000:g}"
        )
    return {k: v for k, v in point["config"].items() if k in BEST_SETTINGS}, point


def recipe_settings(recipe: str, base: str, bits: int | None = None) -> dict[str, Any]:
    """The settings a recipe implies for a base method (at `bits`, where the recipe depends on the width)."""
    if recipe == BEST:
        raise ConfigError("recipe 'best' depends on a bits budget; use best_settings(budget)")
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r} is not known; use one of {', '.join((*RECIPES, BEST))}")
    per_base = RECIPES[recipe]
    if base not in per_base:
        raise ConfigError(f"recipe {recipe!r} has no settings for base {base!r}; it covers {', '.join(per_base)}")
    width = WIDTH_CHANGES.get((recipe, base, bits), {}) if bits is not None else {}
    return {**per_base[base], **width}


REFERENCE_GROUP = 128  # the usual AWQ/GPTQ group size, the paper's AWQ baseline (3-bit g128 = 3.25 bits)


def equal_bits_group_size(
    in_widths: Iterable[int], outliers: float, *, reference: int = REFERENCE_GROUP, group_bits: int = 32
) -> int | None:
    """The smallest group size dividing every input width whose tables (`group_bits` per group: fp16 scale +
    zero) plus the outliers (percent, 48 bits each) cost at most the tables at group size `reference`;
    None (one group per row, the fewest table bits) when no divisor does.

    docs/method.md: 3 + 32/128 = 3.25 bits for AWQ g128, 3 + 32/256 + 0.0025·48 = 3.245 with 0.25% outliers at g256.
    """
    budget = group_bits / reference - outliers / 100 * SPARSE_ENTRY_BITS
    common = math.gcd(*{int(w) for w in in_widths})
    for g in range(1, common + 1):
        if common % g == 0 and group_bits / g <= budget + 1e-12:
            return g
    return None
