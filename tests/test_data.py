import pytest
import torch

from requant import data
from requant.errors import ConfigError, InputError


def test_wiki_split_is_by_article_in_file_order():
    from requant.assets import text_file

    docs = data.split_wiki_articles(text_file("wiki").read_text(encoding="utf-8"))
    assert len(docs) == 2349
    assert not any(line.startswith("<doc") or line.startswith("</doc") for d in docs for line in d.splitlines())
    train, test = data.train_test_split(docs)
    assert len(train) == 1174 and len(test) == 1175 and train + test == docs
    assert data.load_text("wiki:train") == "\n\n".join(train)
    assert data.load_text("wiki:test").startswith(test[0])


def test_c4_documents():
    text = data.load_text("c4")
    assert len(text.split("\n\n")) == 118


def test_split_articles_strips_tags():
    raw = '<doc id="1" title="A">\nA\n\nbody a\n</doc>\n<doc id="2">\nB\n</doc>\n'
    assert data.split_wiki_articles(raw) == ["A\n\nbody a", "B"]


def test_calibration_windows_are_reproducible_slices():
    ids = torch.arange(1000)
    a = data.calibration_windows(ids, 8, 50, seed=3)
    b = data.calibration_windows(ids, 8, 50, seed=3)
    c = data.calibration_windows(ids, 8, 50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 50)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 49, dtype=torch.long))  # contiguous slices
    assert int(a.max()) < 1000


def test_eval_windows_non_overlapping_from_start():
    ids = torch.arange(1003)
    w = data.eval_windows(ids, 100)
    assert w.shape == (10, 100) and torch.equal(w.flatten(), ids[:1000])
    assert data.eval_windows(ids, 100, limit=3).shape == (3, 100)


def test_bad_text_inputs(text_file):
    with pytest.raises(ConfigError, match="unknown text 'wiki:dev'"):
        data.load_text("wiki:dev")
    with pytest.raises(InputError, match="too short for one window of 2000"):
        data.eval_windows(torch.arange(100), 2000)
    with pytest.raises(ConfigError, match="nsamples 0"):
        data.calibration_windows(torch.arange(100), 0, 10, 0)
    assert data.load_text(str(text_file)).startswith(text_file.read_text()[:20])


def test_non_utf8_file(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(InputError, match="not UTF-8"):
        data.load_text(str(p))


def test_bos_windows_are_bos_plus_the_stream_and_keep_their_length(text_file):
    from helpers import byte_tokenizer

    tok = byte_tokenizer(add_bos=True)
    assert data.adds_bos(tok) and data.window_bos(tok, "auto") == 256
    stream = data.tokenize(tok, data.load_text(str(text_file)), special_tokens=False)
    assert int(stream[0]) != 256  # the stream itself carries no BOS: each window gets its own
    w = data.text_windows(tok, str(text_file), 32, bos="auto")
    k = stream.numel() // 31
    assert w.shape == (k, 32) and torch.equal(w[:, 0], torch.full((k,), 256))
    assert torch.equal(w[:, 1:].flatten(), stream[: k * 31])  # BOS + 31 text tokens, non-overlapping, in order
    assert torch.equal(data.text_windows(tok, str(text_file), 32, limit=3, bos="auto"), w[:3])
    c = data.calibration_windows(torch.arange(1000), 8, 50, seed=3, bos=9999)
    assert c.shape == (8, 50) and torch.equal(c[:, 0], torch.full((8,), 9999))
    assert torch.equal(c[:, 2:] - c[:, 1:-1], torch.ones(8, 48, dtype=torch.long))  # BOS + a contiguous slice
    cal = data.text_windows(tok, str(text_file), 32, nsamples=4, seed=0, bos="auto")
    assert cal.shape == (4, 32) and (cal[:, 0] == 256).all() and not (cal[:, 1:] == 256).any()


def test_bos_never_and_auto_without_one_are_todays_windows(text_file):
    from helpers import byte_tokenizer

    plain, adds = byte_tokenizer(), byte_tokenizer(add_bos=True)
    assert not data.adds_bos(plain) and data.window_bos(plain, "auto") is None
    for tok, mode in ((plain, "auto"), (plain, "never"), (adds, "never")):
        today = data.tokenize(tok, data.load_text(str(text_file)))  # the tokenizer's default special tokens
        assert torch.equal(data.text_windows(tok, str(text_file), 32, bos=mode), data.eval_windows(today, 32))
        cal = data.text_windows(tok, str(text_file), 32, nsamples=4, seed=2, bos=mode)
        assert torch.equal(cal, data.calibration_windows(today, 4, 32, seed=2))
    # A BOS-adding tokenizer under `never`: only the stream's own first token is a BOS, as before.
    w = data.text_windows(adds, str(text_file), 32, bos="never")
    assert int(w[0, 0]) == 256 and not (w.flatten()[1:] == 256).any()
    # `always` prepends the BOS of a tokenizer that does not add it by default.
    assert (data.text_windows(plain, str(text_file), 32, bos="always")[:, 0] == 256).all()


def test_bos_always_without_a_bos_token_and_unknown_modes_are_refused(text_file):
    from helpers import byte_tokenizer

    tok = byte_tokenizer(bos=False)
    assert not data.adds_bos(tok) and data.window_bos(tok, "auto") is None
    with pytest.raises(ConfigError, match=r"^bos 'always' needs a BOS token and the tokenizer has none; use auto or"):
        data.text_windows(tok, str(text_file), 32, bos="always")
    with pytest.raises(ConfigError, match=r"bos 'first' is not allowed; use one of auto, always, never"):
        data.window_bos(tok, "first")


def test_the_embedded_tokenizer_adds_no_bos():
    from transformers import AutoTokenizer

    from requant.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    assert tok.bos_token_id is not None and not data.adds_bos(tok)  # so `auto` leaves its windows as they were
