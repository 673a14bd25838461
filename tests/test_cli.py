import json

import pytest

from requant.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_eval_json(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = run(
        capsys,
        "quantize",
        str(model_dir),
        "-o",
        str(out),
        "--base",
        "squeezellm",
        "--bits",
        "3",
        "--outliers",
        "0.5",
        "--significant",
        "0.1",
        "--calib",
        str(text_file),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--json",
    )
    assert code == 0 and " in " not in err  # --json: no progress lines or bars
    rep = json.loads(stdout)
    assert 3 < rep["bits_per_weight"] < 6 and rep["sparse_percent"] == pytest.approx(0.6, abs=0.1)
    code, stdout, _ = run(
        capsys,
        "eval",
        str(out),
        "--data",
        str(text_file),
        "--seqlen",
        "32",
        "--limit",
        "3",
        "--kl-to",
        str(model_dir),
        "--json",
    )
    assert code == 0
    res = json.loads(stdout)["results"][0]
    assert res["tokens"] == 3 * 31 and res["perplexity"] > 1 and res["kl"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "-o", "X", "--bits", "5"], "bits 5 is not allowed"),
        (["quantize", "-o", "X", "--outliers", "100"], "outlier percent 100.0 is outside"),
        (["quantize", "-o", "X", "--outliers", "-1"], "outlier percent -1.0 is outside"),
        (["quantize", "-o", "X", "--base", "foo"], "base method 'foo' is not allowed"),
        (["eval", "MISSING_DIR/x.gguf"], "does not exist"),
        (["eval", "MISSING_DIR/x.gguf", "--bos", "first"], "--bos 'first' is not allowed; use one of auto, always"),
        (["quantize", "-o", "X", "--bos", "first"], "BOS mode 'first' is not allowed; use one of auto, always"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, argv, message):
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_errors_on_model_and_text(capsys, model_dir, text_file, tmp_path):
    code, _, err = run(
        capsys,
        "quantize",
        str(model_dir),
        "-o",
        str(tmp_path / "o"),
        "--base",
        "rtn",
        "--group-size",
        "48",
        "--calib",
        str(text_file),
        "--seqlen",
        "32",
    )
    assert code == 2 and "group size 48 does not divide the input width 64 of layer model.layers.0" in err
    code, _, err = run(capsys, "eval", str(model_dir), "--data", "nope:text", "--seqlen", "32")
    assert code == 2 and "unknown text 'nope:text'" in err
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    code, _, err = run(capsys, "eval", str(model_dir), "--data", str(short), "--seqlen", "256")
    assert code == 2 and "too short for one window" in err
    code, _, err = run(capsys, "eval", str(model_dir), "--data", str(text_file), "--seqlen", "257")
    assert code == 2 and "--seqlen 257 is longer than the model's context of 256 tokens" in err
    assert not (tmp_path / "o").exists()


def test_eval_reports_its_bos_windows(capsys, tmp_path, model, text_file):
    from helpers import byte_tokenizer

    d = tmp_path / "bos-model"  # the tiny model with a tokenizer that puts <s> before every text, as Llama's
    model.save_pretrained(d)
    byte_tokenizer(add_bos=True).save_pretrained(d)
    base = ["eval", str(d), "--data", str(text_file), "--seqlen", "32", "--limit", "3"]
    res = {m: json.loads(run(capsys, *base, "--bos", m, "--json")[1])["results"][0] for m in ("auto", "never")}
    assert res["auto"]["bos"] is True and res["never"]["bos"] is False
    assert res["auto"]["tokens"] == res["never"]["tokens"] == 3 * 31  # BOS + 31 scored text tokens per window
    assert res["auto"]["perplexity"] != res["never"]["perplexity"]
    code, out, _ = run(capsys, *base)
    assert code == 0 and "| BOS |" in out and f"| {res['auto']['tokens']} | 3 | yes |" in out


def test_bos_always_without_a_bos_token_is_refused_in_one_line(capsys, tmp_path, model, text_file):
    from helpers import byte_tokenizer

    d = tmp_path / "no-bos"
    model.save_pretrained(d)
    byte_tokenizer(bos=False).save_pretrained(d)
    capsys.readouterr()  # the save's progress bar
    for argv in (
        ["eval", str(d), "--data", str(text_file), "--seqlen", "32"],
        ["quantize", str(d), "-o", str(tmp_path / "q"), "--base", "rtn", "--seqlen", "32"],  # reads no windows
    ):
        code, out, err = run(capsys, *argv, "--bos", "always")
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert "bos 'always' needs a BOS token and the tokenizer has none; use auto or never" in err
    assert not (tmp_path / "q").exists()


def test_existing_output_refused_before_work(capsys, model_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "something.txt").write_text("x")
    code, _, err = run(capsys, "quantize", str(model_dir), "-o", str(out), "--base", "rtn", "--seqlen", "32")
    assert code == 2 and "not a requant checkpoint" in err and (out / "something.txt").exists()


def test_recipe_fills_defaults_and_flags_override(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "r"
    code, stdout, err = run(
        capsys,
        "quantize",
        str(model_dir),
        "-o",
        str(out),
        "--recipe",
        "requant",
        "--bits",
        "3",
        "--significant",
        "0.2",
        "--step",
        "0.1",
        "--calib",
        str(text_file),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--alg1-steps",
        "2",
        "--keep-work",
        "--json",
    )
    assert code == 0, err
    cfg = json.loads(stdout)["config"]
    assert cfg["outlier_select"] == "adaptive" and cfg["outliers"] == 0.45 and cfg["significant_select"] == "pqi"
    assert cfg["significant"] == 0.2 and cfg["step"] == 0.1 and (cfg["pqi_rule"], cfg["pqi_nodes"]) == ("right", 1)
    assert (tmp_path / "r.work" / "dense.json").is_file()
    code, _, err = run(capsys, "quantize", str(model_dir), "-o", str(tmp_path / "x"), "--recipe", "nope")
    assert code == 2 and "recipe 'nope' is not known" in err


def test_resume_refuses_other_settings(capsys, model_dir, text_file, tmp_path):
    common = [
        "quantize",
        str(model_dir),
        "-o",
        str(tmp_path / "q"),
        "--calib",
        str(text_file),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--keep-work",
    ]
    assert run(capsys, *common, "--bits", "3")[0] == 0
    code, _, err = run(capsys, *common, "--bits", "4", "--resume", "--force")
    assert code == 2 and "cannot resume" in err and "bits" in err


def test_recipe_follows_the_width_and_flags_still_win():
    from requant.cli import build_parser
    from requant.cli.quantize import config_from_args

    def cfg(*flags):
        return config_from_args(build_parser().parse_args(["quantize", "-o", "x", "--recipe", "requant", *flags]))

    assert (cfg("--bits", "3").pqi_rule, cfg("--bits", "3").pqi_nodes) == ("right", 1)
    assert (cfg("--bits", "2").pqi_rule, cfg("--bits", "2").pqi_nodes) == ("gauss", 2)
    c = cfg("--bits", "2", "--pqi-rule", "right", "--pqi-nodes", "1")
    assert (c.pqi_rule, c.pqi_nodes, c.bits) == ("right", 1, 2)


def test_argparse_errors_keep_their_usage_block(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "-o", "x", "--bits", "abc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: requant quantize")
    assert err.strip().splitlines()[-1] == "requant quantize: error: argument --bits: invalid int value: 'abc'"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "--temperature nan is not allowed"),
        (["--temperature=-inf"], "--temperature -inf is not allowed"),
        (["--temperature", "0.5", "--top-p", "0"], "--top-p 0.0 is not allowed"),
        (["--temperature", "0.5", "--top-p", "nan"], "--top-p nan is not allowed"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    ],
)
def test_generate_refuses_non_finite_sampling(capsys, flags, message):
    code, _, err = run(capsys, "generate", "MISSING", "hi", *flags)  # refused before the model is looked at
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_generate_samples_with_top_p(capsys, model_dir):
    base = ["generate", str(model_dir), "ab", "--max-new-tokens", "6", "--json", "--temperature", "1.5"]
    outs = {json.loads(run(capsys, *base, "--top-p", p, "--seed", "3")[1])["continuation"] for p in ("1e-9", "1")}
    greedy = json.loads(run(capsys, *base[:-2], "--json")[1])["continuation"]
    # The tiniest nucleus holds only the most likely token: sampling from it is greedy decoding.
    assert json.loads(run(capsys, *base, "--top-p", "1e-9")[1])["continuation"] == greedy and len(outs) >= 1


def test_quantize_flags_are_generated_from_every_config_setting():
    """Every QuantConfig setting but base_options has a quantize flag; no flags at all give QuantConfig()."""
    import dataclasses

    from requant.cli import build_parser
    from requant.cli.quantize import config_from_args
    from requant.config import QuantConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["quantize"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(QuantConfig)} - {"base_options"} <= dests
    assert config_from_args(parser.parse_args(["quantize", "-o", "x"])) == QuantConfig()
    # the allowed values are structured (the metavar), and the same list QuantConfig checks
    base = next(a for a in sub._actions if a.dest == "base")
    assert base.metavar == "{" + ",".join(QuantConfig.field_info("base").metadata["choices"]) + "}"


def test_sensitivity_flags_keep_their_names_and_defaults():
    from requant.cli import build_parser
    from requant.cli.common import build_config

    args = build_parser().parse_args(["sensitivity", "--report", "nodes", "--dtype", "bf16", "--include", "q_proj"])
    c = build_config(args)
    assert (c.bits, c.nsamples, c.grad_dtype, c.include, c.bos) == (4, 8, "bf16", ("q_proj",), "auto")
    assert (
        build_config(build_parser().parse_args(["sensitivity", "--report", "nodes", "--bos", "never"])).bos == "never"
    )


def test_without_json_each_stage_reports_one_line_on_stderr(capsys, model_dir, text_file, tmp_path, monkeypatch):
    import requant.progress as progress

    monkeypatch.setattr(progress, "_terminal", lambda: False)
    flags = ["--base", "squeezellm", "--outliers", "0.5", "--significant", "0.1", "--calib", str(text_file)]
    code, stdout, err = run(
        capsys, "quantize", str(model_dir), "-o", str(tmp_path / "q"), *flags, "--nsamples", "2", "--seqlen", "32"
    )
    assert code == 0 and stdout.startswith("wrote ")
    import re

    # (transformers' own "Writing model shards" bar, drawn while the checkpoint is saved, is not ours)
    lines = [x for x in re.split(r"[\r\n]", err) if x.strip() and not x.startswith("Writing model shards")]
    assert all(re.fullmatch(r"[^:]+: \d+/\d+ \w+ in \d+\.\d s", x) for x in lines), lines
    assert [x.split(":")[0] for x in lines] == ["fisher", "quantize squeezellm"]


def test_recipe_best_picks_from_the_measured_table_and_flags_still_win(capsys):
    from requant.cli import build_parser
    from requant.cli.quantize import config_from_args
    from requant.recipes import best_point, best_table

    def cfg(*flags):
        return config_from_args(build_parser().parse_args(["quantize", "-o", "x", "--recipe", "best", *flags]))

    point = best_point(best_table()["points"], 3.5)
    c = cfg("--bits-budget", "3.5", "--nsamples", "4")
    assert (c.base, c.bits, c.nsamples) == (point["base"], point["bits"], 4)
    assert c.outliers == point["config"]["outliers"] and c.significant == point["config"]["significant"]
    assert cfg("--bits-budget", "3.5", "--pqi-nodes", "5").pqi_nodes == 5  # an explicit flag wins
    sq = cfg("--bits-budget", "4.7", "--base", "squeezellm", "--bits", "3")
    assert (sq.base, sq.bits) == ("squeezellm", 3)
    for flags, message in [
        (["--recipe", "best"], "--recipe best needs --bits-budget B"),
        (["--recipe", "best", "--bits-budget", "1.5"], "--bits-budget 1.5 is below every measured configuration"),
        (["--bits-budget", "3"], "--bits-budget 3 needs --recipe best"),
        (["--base-option", "grid"], "--base-option 'grid' is not KEY=VALUE"),
    ]:
        code, _, err = run(capsys, "quantize", "-o", "x", *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_base_option_reaches_the_quantizer_options():
    from requant.cli import build_parser
    from requant.cli.quantize import config_from_args

    args = build_parser().parse_args(
        ["quantize", "-o", "x", "--base", "gptq", "--base-option", "grid=lut", "--base-option", "act_order=true"]
    )
    assert config_from_args(args).base_options == {"grid": "lut", "act_order": True}
