"""`requant sensitivity` end to end on the tiny model, and the plots it writes."""

import json
import sys
from pathlib import Path

import pytest

from requant.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def base_args(model_dir, text_file):
    return ["sensitivity", str(model_dir), "--bits", "3", "--calib", str(text_file), "--nsamples", "2"]


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_nodes_report_json_and_plot(capsys, base_args, tmp_path):
    argv = [*base_args, "--seqlen", "32", "--report", "nodes", "--rules", "midpoint,gauss", "--nodes", "1,2,4"]
    code, out, _ = run(capsys, *argv, "--json", "--plot", str(tmp_path / "plots"))
    assert code == 0
    obj = json.loads(out)
    assert obj["report"] == "nodes" and len(obj["rows"]) == 6
    for row in obj["rows"]:
        assert set(row) >= {"rule", "nodes", "predicted", "actual", "rel_error", "grad_evals"}
    gauss4 = next(r for r in obj["rows"] if r["rule"] == "gauss" and r["nodes"] == 4)
    mid1 = next(r for r in obj["rows"] if r["rule"] == "midpoint" and r["nodes"] == 1)
    assert abs(gauss4["rel_error"]) < abs(mid1["rel_error"])
    assert obj["setting"]["layers"] == 14 and obj["setting"]["bits"] == 3
    (png,) = obj["plots"]
    assert Path(png).read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "report,extra,keys",
    [
        ("lambda", ["--lambdas", "0.5,0.01"], {"lambda", "first_order", "second_order", "actual"}),
        ("sublayers", ["--pqi-nodes", "2", "--pqi-rule", "gauss"], {"block", "q", "k", "v", "o", "gate", "up", "down"}),
        ("coverage", ["--pqi-nodes", "1", "--percents", "1,10"], {"percent", "share"}),
        (
            "blocks",
            ["--pqi-nodes", "1"],
            {"block", "first_order", "second_order", "fisher_second_order", "actual", "pqi"},
        ),
    ],
)
def test_every_report_prints_markdown_and_plots(capsys, base_args, tmp_path, report, extra, keys):
    code, out, _ = run(capsys, *base_args, "--seqlen", "16", "--report", report, *extra, "--plot", str(tmp_path))
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("| "))
    assert keys <= {c.strip() for c in header.strip("|").split("|")}
    assert (tmp_path / f"sensitivity_{report}.png").read_bytes()[:8] == PNG
    code, out, _ = run(capsys, *base_args, "--seqlen", "16", "--report", report, *extra, "--json")
    rows = json.loads(out)["rows"]
    assert rows and all(keys <= set(r) for r in rows)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--report", "tables"], "report 'tables' does not exist"),
        (["--report", "nodes", "--nodes", "0,2"], "nodes 0"),
        (["--report", "nodes", "--nodes", "two"], "--nodes 'two'"),
        (["--report", "nodes", "--rules", "simpson"], "rule 'simpson'"),
        (["--report", "lambda", "--lambdas", "0.1,1.5"], "1.5"),
        (["--report", "nodes", "--bits", "5"], "bits 5"),
        (["--report", "nodes", "--base", "magic"], "base method 'magic'"),
        (["--report", "nodes", "--dtype", "fp16"], "--dtype 'fp16'"),
        (["--report", "nodes", "--exclude", "."], "no quantizable layers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, base_args, extra, message):
    code, out, err = run(capsys, *base_args, "--seqlen", "16", *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_missing_matplotlib_stops_before_the_work(capsys, base_args, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, *base_args, "--report", "coverage", "--seqlen", "32", "--plot", str(tmp_path))
    assert code == 2 and "pip install 'requant[plot]'" in err


def test_blocks_report_same_with_offload(capsys, base_args, tmp_path):
    """Hessian-vector products (second order) pass through the checkpointed blocks of an offloaded model."""
    argv = [*base_args, "--seqlen", "16", "--report", "blocks", "--pqi-nodes", "1", "--json"]
    rows = []
    for extra in ([], ["--offload", str(tmp_path / "off")]):
        code, out, _ = run(capsys, *argv, *extra)
        assert code == 0
        rows.append(json.loads(out)["rows"])
    assert len(rows[0]) == len(rows[1]) > 1
    for a, b in zip(*rows, strict=True):
        assert a["block"] == b["block"]
        for k in ("actual", "first_order", "second_order", "fisher_second_order", "pqi"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-12), (a["block"], k)
