"""Fixtures of the format tests: random quantized layers of any kind, width and sparsity."""

from __future__ import annotations

import pytest

from helpers import random_layer


@pytest.fixture
def make_layer():
    return random_layer
