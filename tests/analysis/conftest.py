"""Fixtures for the analysis tests."""

from __future__ import annotations

import pytest

from sensitivity.toys import rtn_weights


@pytest.fixture
def path(model):
    """(names, fp32 original, fp32 3-bit RTN weights) of the tiny Llama's quantizable layers."""
    return rtn_weights(model)
