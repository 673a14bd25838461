"""Every fault of tests/faults_cases.py keeps its promise, and docs/faults.md says what the code does."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults_cases import CASES, LIBRARY_PROMISES, doc_rows, error_lines, make_env, message, run_case

DOC = Path(__file__).resolve().parents[1] / "docs" / "faults.md"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("faults-env"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_keeps_its_promise(case, env, tmp_path):
    code, stderr = run_case(case, env, tmp_path / case.id)
    line = message(stderr)
    assert code == case.code, stderr
    assert "Traceback" not in stderr
    if case.code == 2:
        assert line.startswith(("requant: error: ", "requant quantize: error: ")) and case.must in line, stderr
        if case.id != "argparse-type":  # argparse's usage block stays above its line (the convention)
            assert len(error_lines(stderr)) == 1, stderr  # one line (stages finished before it report theirs)
        else:
            assert stderr.startswith("usage: requant quantize")
    # The document shows exactly this message: regenerate it with `python benchmarks/faults_table.py`.
    assert doc_rows(DOC.read_text(encoding="utf-8")).get(case.case) == (code, line), (
        f"docs/faults.md is stale for {case.id!r}: run `python benchmarks/faults_table.py`"
    )


def test_doc_lists_every_case_and_nothing_else():
    rows = doc_rows(DOC.read_text(encoding="utf-8"))
    assert set(rows) == {c.case for c in CASES}
    assert len({c.id for c in CASES}) == len(CASES)


def test_library_promises_name_existing_tests():
    root = Path(__file__).resolve().parents[1]
    for _what, _promise, test in LIBRARY_PROMISES:
        file, name = test.split("::")
        assert f"def {name}(" in (root / file).read_text(encoding="utf-8"), test
