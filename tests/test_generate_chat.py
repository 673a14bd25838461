"""requant generate --chat: the prompt goes through the tokenizer's chat template, on models and checkpoints."""

from __future__ import annotations

import json

import pytest

from helpers import byte_tokenizer, tiny_llama
from requant import load
from requant.cli import main
from requant.config import QuantConfig
from requant.format import save_checkpoint
from requant.pipeline import quantize

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, model: str, prompt: str, *flags: str) -> dict:
    code, out, err = run(capsys, "generate", model, prompt, "--max-new-tokens", "5", "--json", *flags)
    assert code == 0, err
    return json.loads(out)


def check_chat(capsys, model: str, rendered: str) -> None:
    """--chat on "hello" = the plain prompt `rendered` (the template's text): same tokens in, same tokens out."""
    chat = generate(capsys, model, "hello", "--chat")
    plain = generate(capsys, model, rendered)
    assert chat["prompt_tokens"] == plain["prompt_tokens"] > len("hello")
    assert chat["continuation"] == plain["continuation"]
    assert chat["prompt"] == "hello"


def test_chat_applies_the_template_to_models_and_checkpoints(capsys, tmp_path):
    model, tok = tiny_llama(), byte_tokenizer()
    tok.chat_template = TEMPLATE
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    check_chat(capsys, str(tmp_path / "m"), "<|user|>hello\n<|assistant|>")
    result = quantize(model, tok, QuantConfig(base="rtn", bits=3, outliers=1.0))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok, result)
    assert load(ckpt)[1].chat_template == TEMPLATE  # the checkpoint keeps the template
    check_chat(capsys, str(ckpt), "<|user|>hello\n<|assistant|>")


def test_chat_without_a_template_is_one_error_line(capsys, model_dir):
    code, out, err = run(capsys, "generate", str(model_dir), "hello", "--chat")
    assert code == 2 and out == "" and "has no chat template" in err and len(err.strip().splitlines()) == 1
    assert generate(capsys, str(model_dir), "hello")["prompt_tokens"] == len("hello")  # without --chat: fine


@pytest.mark.integration
def test_chat_with_the_embedded_instruct_tokenizer(capsys, tmp_path):
    from transformers import AutoTokenizer

    from requant.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    assert tok.chat_template  # the embedded model is an instruct model
    # A tiny random model over the embedded tokenizer's vocabulary: the template handling is what is tested.
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhello<|im_end|>" in rendered
    check_chat(capsys, str(tmp_path / "m"), rendered)
