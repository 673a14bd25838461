import pytest
import torch

from helpers import tiny_llama
from requant.errors import ConfigError, InputError
from requant.loading import load_model
from requant.model import find_blocks, quantizable_layers


def test_layers_found_generically(model):
    layers = quantizable_layers(model)
    assert len(layers) == 2 * 7
    assert [layer.kind for layer in layers[:7]] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert {layer.block for layer in layers} == {0, 1}
    assert all("lm_head" not in layer.name for layer in layers)
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2


def test_include_exclude(model):
    only_mlp = quantizable_layers(model, exclude=[r"self_attn"])
    assert len(only_mlp) == 6 and all("mlp" in layer.name for layer in only_mlp)
    with pytest.raises(ConfigError, match="no quantizable layers"):
        quantizable_layers(model, exclude=["."])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        quantizable_layers(model, include=["("])


def test_tied_lm_head_refused_untied_allowed():
    with pytest.raises(ConfigError, match="lm_head"):
        quantizable_layers(tiny_llama(), include=["lm_head"])
    untied = tiny_llama(tie=False)
    assert [layer.name for layer in quantizable_layers(untied, include=["lm_head"])] == ["lm_head"]


def test_load_model_dir_and_bad_paths(model_dir, tmp_path, model):
    m, _ = load_model(model_dir)
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(m(ids).logits, model(ids).logits)
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no config\.json"):
        load_model(empty)
    with pytest.raises(InputError, match="cannot load model"):
        load_model("nobody/not-a-cached-model")
