"""Rewrite the flag tables of docs/cli.md from the `requant` argparse parser (the parser is the one source).

Usage: python benchmarks/cli_doc.py [--check]

Only the parser object is read (its subcommands, argument groups and actions), so the tables follow however
the options are built. The prose around the tables in docs/cli.md is hand-written and kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from docblocks import splice

from requant.cli import build_parser

CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _cell(text: str) -> str:
    """One Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    """The subparsers by name, and each one's one-line help, in registration order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return dict(action.choices), helps
    return {}, {}


def _argument(action: argparse.Action) -> str:
    """How the flag is written, e.g. `-o, --output OUTPUT` or `MODEL` for a positional."""
    if not action.option_strings:
        name = action.metavar or action.dest.upper()
        return f"`{name}`" if action.nargs not in ("?", "*") else f"`[{name}]`"
    takes_value = action.nargs != 0
    meta = ""
    if takes_value:
        meta = " " + (action.metavar if isinstance(action.metavar, str) else action.dest.upper())
        if action.nargs in ("*", "+"):
            meta += " ..."
    return ", ".join(f"`{o}{meta}`" for o in action.option_strings)


def _default(action: argparse.Action) -> str:
    d = action.default
    if action.nargs == 0 or d is None or d is argparse.SUPPRESS or d == []:
        return ""
    return f"`{d}`"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's %(default)s etc.
        text = argparse.HelpFormatter(prog)._expand_help(action)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    if action.required and action.option_strings:
        text = "required; " + text
    return text


def _synopsis(name: str, p: argparse.ArgumentParser) -> str:
    parts = [p.prog]
    for a in p._actions:
        if not a.option_strings:
            n = a.metavar or a.dest.upper()
            parts.append(f"[{n}]" if a.nargs in ("?", "*") else n)
        elif a.required:
            parts.append(f"{a.option_strings[0]} {a.metavar or a.dest.upper()}")
    parts.append("[options]")
    return " ".join(parts)


def command_table(name: str, p: argparse.ArgumentParser, summary: str) -> str:
    """Markdown for one subcommand: synopsis, summary and one table per argument group."""
    lines = [f"`{_synopsis(name, p)}`", "", _cell(summary) + ".", ""]
    for group in p._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"*{group.title}*", "", "| argument | default | meaning |", "|---|---|---|"]
        for a in actions:
            lines.append(f"| {_argument(a)} | {_default(a)} | {_cell(_help(a, p.prog))} |")
        lines.append("")
    return "\n".join(lines)


def blocks() -> dict[str, str]:
    """Generated block bodies of docs/cli.md: the command list and one section per command."""
    parser = build_parser()
    subs, helps = _subcommands(parser)
    out = {
        "commands": "\n".join(
            ["| command | what it does |", "|---|---|"]
            + [f"| [`requant {n}`](#requant-{n}) | {_cell(helps.get(n, ''))} |" for n in subs]
        )
    }
    for n, p in subs.items():
        out[f"cmd:{n}"] = command_table(n, p, helps.get(n, ""))
    return out


def render(text: str) -> str:
    """docs/cli.md text with its generated blocks brought up to date."""
    return splice(text, blocks())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not up to date; write nothing")
    args = ap.parse_args()
    text = CLI_MD.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{CLI_MD} is stale: run python benchmarks/cli_doc.py", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
