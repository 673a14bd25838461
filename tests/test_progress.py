import pytest

import requant.progress as progress


@pytest.fixture(autouse=True)
def loud(monkeypatch):
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setattr(progress, "_terminal", lambda: False)


def test_off_a_terminal_a_stage_writes_one_summary_line(capsys):
    assert list(progress.bar(range(3), desc="fit", unit="layer")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith("fit: 3/3 layer in ")


def test_bars_inside_a_stage_add_no_line_of_their_own(capsys):
    for _ in progress.bar(range(2), desc="pqi nodes", unit="node"):
        inner = progress.bar(total=4, desc="windows", unit="win")
        inner.update(4)
        inner.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pqi nodes: 2/2 node in ")


def test_a_stage_left_early_still_ends_its_line(capsys):
    import torch

    from helpers import tiny_llama
    from requant.model import quantizable_layers
    from requant.sensitivity.gradients import window_gradients

    model = tiny_llama()
    names = [i.name for i in quantizable_layers(model)]
    windows = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    gen = window_gradients(model, names, windows, desc="fisher")
    next(gen)
    gen.close()  # the caller stopped after one window
    lines = capsys.readouterr().err.splitlines()
    # a window counts once the caller asks for the next: one handed out, none finished
    assert len(lines) == 1 and lines[0].startswith("fisher: 0/3 win in ")
    assert list(progress.bar(range(2), desc="next")) == [0, 1]  # the next stage is outermost again
    assert capsys.readouterr().err.startswith("next: 2/2 it in ")


def test_quiet_and_other_ranks_write_nothing(capsys, monkeypatch):
    monkeypatch.setattr(progress, "_QUIET", True)
    list(progress.bar(range(3), desc="fit"))
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setattr(progress, "is_main", lambda: False)
    list(progress.bar(range(3), desc="fit"))
    assert capsys.readouterr().err == ""


def test_on_a_terminal_the_bar_draws_with_an_eta(monkeypatch):
    monkeypatch.setattr(progress, "_terminal", lambda: True)
    b = progress.bar(total=5, desc="eval", unit="win")
    assert not b.disable and b.total == 5  # a known total: tqdm shows the ETA
    b.close()
    assert not progress._OPEN


def test_progress_bars_only_on_rank_0(monkeypatch):
    monkeypatch.setattr(progress, "is_main", lambda: False)
    assert progress.bar(range(3), desc="x").disable is True
