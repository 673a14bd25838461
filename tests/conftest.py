"""Shared fixtures: tiny random Llama-style models and a byte-level tokenizer that need no download."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from helpers import byte_tokenizer, tiny_llama, word_text

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def model_dir(tmp_path: Path, model, tokenizer) -> Path:
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 24), generator=g)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    return word_text(tmp_path / "text.txt")
