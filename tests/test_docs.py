"""The repository's own docs stay true: generated tables match their sources, cited functions exist."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "benchmarks"))

import docblocks  # noqa: E402


def test_splice_rewrites_block_bodies_and_keeps_the_prose():
    text = "intro\n<!-- gen:a -->\nold a\n<!-- /gen:a -->\nmiddle\n<!-- gen:b -->\n<!-- /gen:b -->\nend\n"
    out = docblocks.splice(text, {"a": "new a", "b": "new b\nline 2\n"})
    want = "intro\n<!-- gen:a -->\nnew a\n<!-- /gen:a -->\nmiddle\n"
    want += "<!-- gen:b -->\nnew b\nline 2\n<!-- /gen:b -->\nend\n"
    assert out == want
    assert docblocks.splice(out, {"a": "new a", "b": "new b\nline 2"}) == out  # idempotent


@pytest.mark.parametrize("blocks", [{"a": "x"}, {"a": "x", "b": "y", "c": "z"}])
def test_splice_refuses_blocks_without_a_place_and_places_without_a_block(blocks):
    text = "<!-- gen:a -->\n<!-- /gen:a -->\n<!-- gen:b -->\n<!-- /gen:b -->\n"
    with pytest.raises(ValueError):
        docblocks.splice(text, blocks)


def test_cli_md_matches_the_argparse_parser():
    import cli_doc

    text = (DOCS / "cli.md").read_text()
    assert cli_doc.render(text) == text, "docs/cli.md is stale: run python benchmarks/cli_doc.py"
    # every flag of every command is in it
    subs, _ = cli_doc._subcommands(cli_doc.build_parser())
    for name, p in subs.items():
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in text, f"requant {name} {flag} missing from docs/cli.md"


def test_results_md_matches_the_benchmark_json():
    import tables

    text = (DOCS / "results.md").read_text()
    assert tables.render_results(text) == text, "docs/results.md is stale: run python benchmarks/tables.py"
    readme = (ROOT / "README.md").read_text()
    assert tables.render_readme(readme) == readme, "README.md's headline is stale: run python benchmarks/tables.py"


# `requant.module:attr` or `requant.module:Class.attr` inside backticks
_CITATION = re.compile(r"`(requant(?:\.\w+)*):([\w.]+)`")


def _cited() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted([*DOCS.glob("*.md"), ROOT / "README.md"]):
        out += [(path.name, m.group(1), m.group(2)) for m in _CITATION.finditer(path.read_text())]
    return out


def test_docs_cite_functions_by_module_and_name():
    assert len(_cited()) >= 40  # method.md maps its equations to code


@pytest.mark.parametrize("doc,module,attr", _cited(), ids=lambda v: str(v))
def test_every_cited_function_exists(doc, module, attr):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"{doc} cites {module}:{attr}, which does not exist"
        obj = getattr(obj, part)


def test_nothing_cites_notes_outside_the_repository():
    # The design notes and the paper summary live outside the repository; cite docs/ instead.
    forbidden = ["paper" + ".md", "design" + ".md", "../" + "shared"]
    files = [ROOT / "README.md", *DOCS.glob("*.md")]
    for sub in ("src", "tests", "benchmarks"):
        files += [p for p in (ROOT / sub).rglob("*") if p.suffix in (".py", ".md")]
    bad = [f"{p.relative_to(ROOT)}: {w}" for p in files for w in forbidden if w in p.read_text(errors="replace")]
    assert not bad


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file) if file else path
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)} if dest.exists() else set()
            if not dest.exists() or (anchor and anchor not in anchors):
                broken.append(f"{path.name}: {target}")
    assert not broken
