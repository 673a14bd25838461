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
