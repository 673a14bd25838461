"""User intent as small validated dataclasses; every check names the bad value and what is allowed.

Each field of QuantConfig carries its own help text and allowed values (`option(...)` metadata); the CLI
generates its flags from them (requant.cli.options) and validation reads the same choices.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from .data import BOS_MODES
from .errors import ConfigError
from .quantizers import ALLOWED_BITS, QUANTIZERS
from .sensitivity.quadrature import RULES
from .sparse.adaptive import CRITERIA, OBJECTIVES
from .sparse.allocation import ALLOCATORS
from .sparse.detach import RANKINGS, SCOPES

# Allowed values; each list lives in the module that implements the choice, named here once.
BASES = tuple(QUANTIZERS)
OUTLIER_SELECT = ("iqr", "adaptive", "random")
SIGNIFICANT_SELECT = ("fisher", "pqi", "random")
DTYPES = ("fp32", "bf16")
PQI_RULES = RULES
ALG1_OBJECTIVES = OBJECTIVES
ALG1_CRITERIA = CRITERIA
ALG1_GRANULARITY = ("module", "block")
ALG1_ALLOCATORS = tuple(ALLOCATORS)
DETACH_SCOPES = SCOPES
DETACH_RANKINGS = RANKINGS
SPARSE_VALUES = ("restore", "fit")
# group_size value: the recipe picks the group size at which the outliers cost no more bits than the base
# method's tables at g128 (requant.recipes.equal_bits_group_size); resolved by the pipeline from the widths.
EQUAL_BITS = "equal-bits"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    what: str = "",
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A config field with its help text, its allowed values (checked in __post_init__) and how an error
    names it (`what`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "what": what})


def _choice(value: Any, allowed: tuple[Any, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def _positive(value: int, what: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} {value!r} must be a positive integer")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Percentages are percent of all quantized weights."""

    base: str = option(
        "squeezellm",
        help="base method (awq, gptq and qtip use the calibration inputs)",
        what="base method",
        choices=BASES,
    )
    bits: int = option(3, help="bits per dense weight", what="bits", choices=ALLOWED_BITS)
    # inputs per group; None = per row; EQUAL_BITS = chosen by the recipe from the layers' widths
    group_size: int | str | None = option(None, help="inputs per scale group")
    sym: bool = option(False, help="symmetric uniform grid (rtn)")
    widen_bits: float = option(
        0.0,
        help="bits per weight spent on codes one bit wider (--bits + 1) for the layers where they lower the "
        "Fisher-weighted error Σ F (w − ŵ)² most per extra bit (0: every layer at --bits)",
    )
    outliers: float = option(0.0, help="outlier percent of quantized weights (r_o)")
    outlier_select: str = option(
        "iqr",
        help="how outliers are chosen: iqr (SqueezeLLM), adaptive (Algorithm 1), random",
        what="outlier selection",
        choices=OUTLIER_SELECT,
    )
    significant: float = option(0.0, help="significant-weight percent (r_s)")
    significant_select: str = option(
        "fisher",
        help="how significant weights are chosen: fisher (SqueezeLLM), pqi (Algorithm 2), random",
        what="significant selection",
        choices=SIGNIFICANT_SELECT,
    )
    step: float | None = option(None, help="Algorithm 2 step β in percent (unset: one step of r_s)")
    pqi_nodes: int = option(32, help="PQI quadrature nodes N")
    pqi_rule: str = option("midpoint", help="PQI quadrature rule", what="PQI rule", choices=PQI_RULES)
    pqi_nsamples: int | None = option(None, help="calibration windows for PQI (unset: nsamples)")
    alg1_objective: str = option(
        "base",
        help="Algorithm 1 objective: base (the base method's own error), pqi, or fisher (the Fisher-weighted "
        "error, whatever the base method fits)",
        what="Algorithm 1 objective",
        choices=ALG1_OBJECTIVES,
    )
    alg1_criterion: str = option(
        "magnitude",
        help="Algorithm 1: which entries become outliers first",
        what="Algorithm 1 outlier criterion",
        choices=ALG1_CRITERIA,
    )
    alg1_granularity: str = option(
        "module",
        help="Algorithm 1: one outlier ratio per module or per block",
        what="Algorithm 1 granularity",
        choices=ALG1_GRANULARITY,
    )
    alg1_steps: int = option(8, help="Algorithm 1 candidate ratios {0, 1/steps, ..., max_factor} × budget")
    alg1_max_factor: float = option(4.0, help="Algorithm 1 largest candidate ratio / budget")
    alg1_allocator: str = option(
        "greedy",
        help="Algorithm 1 knapsack solver",
        what="Algorithm 1 allocator",
        choices=ALG1_ALLOCATORS,
    )
    detach_scope: str = option(
        "global",
        help="Algorithm 2 top-k over all layers (global) or per module",
        what="detach scope",
        choices=DETACH_SCOPES,
    )
    detach_ranking: str = option(
        "abs",
        help="Algorithm 2 ranking: abs (|ΔF_PQI|) or positive (ΔF_PQI > 0 only)",
        what="detach ranking",
        choices=DETACH_RANKINGS,
    )
    detach_refit: bool = option(
        False,
        help="after Algorithm 2, refit the dense part with the detached entries left out too (inside the base "
        "method's error feedback, as the outliers are) instead of restoring them over the first fit",
    )
    sparse_values: str = option(
        "restore",
        help="values of the sparse entries: restore (the original weights) or fit (least squares on each "
        "layer's calibration inputs, the dense part fixed)",
        what="sparse values",
        choices=SPARSE_VALUES,
    )
    calib: str = option("wiki:train", help="calibration text (wiki:train, c4:train, ... or a file)")
    nsamples: int = option(32, help="calibration windows")
    seqlen: int = option(512, help="tokens per window")
    seed: int = option(0, help="seed of the window sampling")
    bos: str = option(
        "auto",
        help="BOS token at the start of every window: auto (if the tokenizer adds one), always, never",
        what="BOS mode",
        choices=BOS_MODES,
    )
    expert_min_tokens: int = option(
        32,
        help="MoE: an expert routed fewer calibration tokens gets its siblings' pooled input statistics and "
        "uniform Fisher importance",
    )
    grad_dtype: str = option("fp32", help="model dtype for gradient passes", what="gradient dtype", choices=DTYPES)
    include: tuple[str, ...] = option((), help="regex of layer names to quantize (repeat)")
    exclude: tuple[str, ...] = option((), help="regex of layer names to skip (repeat)")
    base_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "base quantizer keyword options"})

    @staticmethod
    def field_info(name: str) -> dataclasses.Field:
        """The dataclass field of a setting (its default, help text and choices)."""
        for f in dataclasses.fields(QuantConfig):
            if f.name == name:
                return f
        raise ConfigError(f"unknown config setting {name!r}")

    def quantizer_options(self) -> dict[str, Any]:
        """Keyword options of the base quantizer: `base_options` plus the flags that have their own field."""
        return {**self.base_options, **({"sym": True} if self.sym else {})}

    def __post_init__(self) -> None:
        _choice(self.base, BASES, "base method")
        _choice(self.bits, ALLOWED_BITS, "bits")
        if self.group_size is not None and self.group_size != EQUAL_BITS:
            _positive(self.group_size, "group size")
        if not 0 <= self.widen_bits < 1:
            raise ConfigError(f"widen bits {self.widen_bits} is outside the allowed range [0, 1) bits per weight")
        if self.widen_bits > 0 and self.bits + 1 not in ALLOWED_BITS:
            wider = ", ".join(str(b) for b in ALLOWED_BITS if b + 1 in ALLOWED_BITS)
            raise ConfigError(f"--widen-bits needs codes of bits + 1 = {self.bits + 1}; use --bits {wider} with it")
        for pct, what in ((self.outliers, "outlier percent"), (self.significant, "significant percent")):
            if not 0 <= pct < 100:
                raise ConfigError(f"{what} {pct} is outside the allowed range [0, 100)")
        if self.outliers + self.significant >= 100:
            raise ConfigError(
                f"outliers + significant = {self.outliers + self.significant}% leaves no dense weights; "
                "the sum must be below 100"
            )
        for f in dataclasses.fields(self):  # every setting with a list of allowed values, in field order
            if f.metadata.get("choices") and f.name not in ("base", "bits"):
                _choice(getattr(self, f.name), f.metadata["choices"], f.metadata["what"])
        if self.step is not None and not 0 < self.step <= max(self.significant, 0):
            raise ConfigError(f"detach step {self.step} must be in (0, significant={self.significant}] percent")
        if self.detach_refit and not (self.significant > 0 and self.significant_select != "fisher"):
            raise ConfigError(
                "detach refit needs detached entries: --significant > 0 with --significant-select pqi or random"
            )
        _positive(self.pqi_nodes, "PQI nodes")
        if self.pqi_nsamples is not None:
            _positive(self.pqi_nsamples, "PQI nsamples")
        _positive(self.alg1_steps, "Algorithm 1 grid steps")
        if not self.alg1_max_factor >= 1:
            raise ConfigError(f"Algorithm 1 max factor {self.alg1_max_factor} must be at least 1")
        if (self.outliers > 0 or self.significant > 0) and not QUANTIZERS[self.base].supports_exclude:
            raise ConfigError(
                f"base method {self.base!r} cannot leave entries out of its fit; "
                "use --outliers 0 --significant 0 with it"
            )
        if not isinstance(self.expert_min_tokens, int) or self.expert_min_tokens < 0:
            raise ConfigError(f"expert min tokens {self.expert_min_tokens!r} must be a non-negative integer")
        _positive(self.nsamples, "nsamples")
        _positive(self.seqlen, "seqlen")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen {self.seqlen} must be at least 2")
        if self.sym and "sym" not in inspect.signature(QUANTIZERS[self.base].__init__).parameters:
            with_sym = [n for n, q in QUANTIZERS.items() if "sym" in inspect.signature(q.__init__).parameters]
            raise ConfigError(f"--sym has no meaning for base {self.base!r}; it applies to {', '.join(with_sym)}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def fisher_sensitive(self) -> bool:
        """SqueezeLLM's sensitive values: the top Fisher entries, chosen before the dense fit and kept out of it."""
        return self.significant > 0 and self.significant_select == "fisher"

    @property
    def needs_fisher(self) -> bool:
        return (
            QUANTIZERS[self.base].uses_importance
            or self.fisher_sensitive
            or (self.outliers > 0 and self.outlier_select == "adaptive" and self.alg1_objective == "fisher")
            or self.widen_bits > 0
        )

    @property
    def needs_pqi_pre(self) -> bool:
        """Algorithm 1 variants that need one PQI pass between w and the pre-quantized w̃_pre."""
        return (
            self.outliers > 0
            and self.outlier_select == "adaptive"
            and (self.alg1_objective == "pqi" or self.alg1_criterion == "pqi_pre")
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def differences(self, other: QuantConfig) -> list[str]:
        """Names of settings that differ, e.g. to refuse resuming with another config."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]
