"""Generated blocks inside hand-written Markdown: `<!-- gen:NAME -->` ... `<!-- /gen:NAME -->` is rewritten,
everything outside the markers is kept as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_BLOCK = re.compile(r"(<!-- gen:(?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)", re.DOTALL)


def block_names(text: str) -> list[str]:
    """Names of the generated blocks in `text`, in order."""
    return [m.group("name") for m in _BLOCK.finditer(text)]


def splice(text: str, blocks: Mapping[str, str]) -> str:
    """`text` with the body of every generated block replaced by `blocks[name]`.

    Every block in the text must have a body and every body a block, so that a renamed or new table is
    noticed instead of silently dropped.
    """
    names = block_names(text)
    missing = sorted(set(blocks) - set(names))
    unknown = sorted(set(names) - set(blocks))
    if missing or unknown:
        raise ValueError(f"generated blocks without a place: {missing}; places without a generator: {unknown}")
    return _BLOCK.sub(lambda m: m.group(1) + blocks[m.group("name")].rstrip("\n") + "\n" + m.group(4), text)
