"""User intent as small validated dataclasses; every check names the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .quantizers import ALLOWED_BITS, QUANTIZERS
from .sensitivity.quadrature import RULES

OUTLIER_SELECT = ("iqr", "adaptive", "random")
SIGNIFICANT_SELECT = ("fisher", "pqi", "random")
DTYPES = ("fp32", "bf16")
PQI_RULES = RULES  # one list: the quadrature module owns it
ALG1_OBJECTIVES = ("base", "pqi")
ALG1_CRITERIA = ("magnitude", "pqi_pre")
ALG1_GRANULARITY = ("module", "block")
ALG1_ALLOCATORS = ("greedy", "lagrange")
DETACH_SCOPES = ("global", "module")
DETACH_RANKINGS = ("abs", "positive")
# group_size value: the recipe picks the group size at which the outliers cost no more bits than the base
# method's tables at g128 (requant.recipes.equal_bits_group_size); resolved by the pipeline from the widths.
EQUAL_BITS = "equal-bits"


def _choice(value: Any, allowed: tuple[Any, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def _positive(value: int, what: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} {value!r} must be a positive integer")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Percentages are percent of all quantized weights."""

    base: str = "squeezellm"
    bits: int = 3
    group_size: int | str | None = None  # inputs per group; None = per row; EQUAL_BITS = chosen by the recipe
    sym: bool = False
    outliers: float = 0.0
    outlier_select: str = "iqr"
    significant: float = 0.0
    significant_select: str = "fisher"
    step: float | None = None  # β of Algorithm 2, percent per detach step; None = a single step
    pqi_nodes: int = 32
    pqi_rule: str = "midpoint"
    pqi_nsamples: int | None = None  # calibration windows for PQI; None = nsamples
    alg1_objective: str = "base"
    alg1_criterion: str = "magnitude"
    alg1_granularity: str = "module"
    alg1_steps: int = 8  # candidate ratios {0, 1/steps, ..., max_factor} × budget
    alg1_max_factor: float = 4.0
    alg1_allocator: str = "greedy"
    detach_scope: str = "global"
    detach_ranking: str = "abs"
    calib: str = "wiki:train"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    grad_dtype: str = "fp32"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    base_options: dict[str, Any] = field(default_factory=dict)

    def quantizer_options(self) -> dict[str, Any]:
        """Keyword options of the base quantizer: `base_options` plus the flags that have their own field."""
        return {**self.base_options, **({"sym": True} if self.sym else {})}

    def __post_init__(self) -> None:
        _choice(self.base, tuple(QUANTIZERS), "base method")
        _choice(self.bits, ALLOWED_BITS, "bits")
        if self.group_size is not None and self.group_size != EQUAL_BITS:
            _positive(self.group_size, "group size")
        for pct, what in ((self.outliers, "outlier percent"), (self.significant, "significant percent")):
            if not 0 <= pct < 100:
                raise ConfigError(f"{what} {pct} is outside the allowed range [0, 100)")
        if self.outliers + self.significant >= 100:
            raise ConfigError(
                f"outliers + significant = {self.outliers + self.significant}% leaves no dense weights; "
                "the sum must be below 100"
            )
        _choice(self.outlier_select, OUTLIER_SELECT, "outlier selection")
        _choice(self.significant_select, SIGNIFICANT_SELECT, "significant selection")
        if self.step is not None and not 0 < self.step <= max(self.significant, 0):
            raise ConfigError(f"detach step {self.step} must be in (0, significant={self.significant}] percent")
        _positive(self.pqi_nodes, "PQI nodes")
        _choice(self.pqi_rule, PQI_RULES, "PQI rule")
        if self.pqi_nsamples is not None:
            _positive(self.pqi_nsamples, "PQI nsamples")
        _choice(self.alg1_objective, ALG1_OBJECTIVES, "Algorithm 1 objective")
        _choice(self.alg1_criterion, ALG1_CRITERIA, "Algorithm 1 outlier criterion")
        _choice(self.alg1_granularity, ALG1_GRANULARITY, "Algorithm 1 granularity")
        _choice(self.alg1_allocator, ALG1_ALLOCATORS, "Algorithm 1 allocator")
        _positive(self.alg1_steps, "Algorithm 1 grid steps")
        if not self.alg1_max_factor >= 1:
            raise ConfigError(f"Algorithm 1 max factor {self.alg1_max_factor} must be at least 1")
        _choice(self.detach_scope, DETACH_SCOPES, "detach scope")
        _choice(self.detach_ranking, DETACH_RANKINGS, "detach ranking")
        if (self.outliers > 0 or self.significant > 0) and not QUANTIZERS[self.base].supports_exclude:
            raise ConfigError(
                f"base method {self.base!r} cannot leave entries out of its fit; "
                "use --outliers 0 --significant 0 with it"
            )
        _positive(self.nsamples, "nsamples")
        _positive(self.seqlen, "seqlen")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen {self.seqlen} must be at least 2")
        _choice(self.grad_dtype, DTYPES, "gradient dtype")
        if self.sym and "sym" not in inspect.signature(QUANTIZERS[self.base].__init__).parameters:
            with_sym = [n for n, q in QUANTIZERS.items() if "sym" in inspect.signature(q.__init__).parameters]
            raise ConfigError(f"--sym has no meaning for base {self.base!r}; it applies to {', '.join(with_sym)}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def needs_fisher(self) -> bool:
        return QUANTIZERS[self.base].uses_importance or (self.significant > 0 and self.significant_select == "fisher")

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
