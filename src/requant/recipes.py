"""Named presets: the paper's settings per base method (paper.md §6, Table 10), overridable flag by flag."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

# ReQuant per base method. PQI runs with 2 Gauss-Legendre nodes: on the reference setting it predicts ΔF as
# well as the paper's 32 midpoint intervals at 1/16 of the cost (see README, "PQI accuracy").
_REQUANT_DNS = {
    "outliers": 0.45,
    "outlier_select": "adaptive",
    "significant": 0.05,
    "significant_select": "pqi",
    "step": 0.025,
    "pqi_nodes": 2,
    "pqi_rule": "gauss",
}
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "requant": {
        "squeezellm": _REQUANT_DNS,
        "rtn": _REQUANT_DNS,
        "awq": {"outliers": 0.25, "outlier_select": "adaptive", "significant": 0.0},
        "gptq": {"outliers": 0.25, "outlier_select": "adaptive", "significant": 0.0},
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


def recipe_settings(recipe: str, base: str) -> dict[str, Any]:
    """The settings a recipe implies for a base method."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r} is not known; use one of {', '.join(RECIPES)}")
    per_base = RECIPES[recipe]
    if base not in per_base:
        raise ConfigError(f"recipe {recipe!r} has no settings for base {base!r}; it covers {', '.join(per_base)}")
    return dict(per_base[base])
