"""Issue-2 baselines on the reference setting R: perplexity and bits of fp32, RTN and SqueezeLLM variants.

Usage: python benchmarks/baselines.py [--limit N] [--only NAME ...]   (full wiki:test and c4 by default)
"""

from __future__ import annotations

from harness import parser, run_variants

from requant.config import QuantConfig

VARIANTS: dict[str, QuantConfig | None] = {
    "fp32": None,
    "rtn-4bit-row": QuantConfig(base="rtn", bits=4),
    "rtn-3bit-row": QuantConfig(base="rtn", bits=3),
    "rtn-2bit-row": QuantConfig(base="rtn", bits=2),
    "rtn-3bit-g64": QuantConfig(base="rtn", bits=3, group_size=64),
    "squeezellm-4bit-dense": QuantConfig(base="squeezellm", bits=4),
    "squeezellm-3bit-dense": QuantConfig(base="squeezellm", bits=3),
    "squeezellm-2bit-dense": QuantConfig(base="squeezellm", bits=2),
    "squeezellm-3bit-D&S": QuantConfig(base="squeezellm", bits=3, outliers=0.45, significant=0.05),
}

if __name__ == "__main__":
    run_variants(
        VARIANTS, parser(__doc__).parse_args(), "baselines", "D&S = 0.45% IQR outliers + 0.05% Fisher-sensitive values."
    )
