"""Text corpora, their deterministic splits, tokenization and the two kinds of windows.

Named texts:
  wiki:train, wiki:test  the embedded Wikipedia calibration text (exllamav2 wheel), split by article in
                         file order: the first floor(n/2) articles are train, the rest test
  wiki                   all embedded Wikipedia articles
  c4                     the embedded C4 documents (one per line)
  hf:wikitext2:{train,validation,test}, hf:c4:validation
                         WikiText-2 raw / allenai C4 through `datasets`, only if already in the local cache
  any other value        a UTF-8 text file path
Documents are joined with blank lines ("\\n\\n"), as in the GPTQ perplexity protocol.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from .assets import text_file
from .errors import ConfigError, InputError

_DOC_TAG = re.compile(r"^</?doc[^>]*>\s*$")
EMBEDDED = ("wiki", "wiki:train", "wiki:test", "c4")
HF_TEXTS = ("hf:wikitext2:train", "hf:wikitext2:validation", "hf:wikitext2:test", "hf:c4:validation")


def split_wiki_articles(raw: str) -> list[str]:
    """Articles of the embedded wiki text in file order, with the `<doc ...>` tag lines removed."""
    articles: list[str] = []
    current: list[str] | None = None
    for line in raw.splitlines():
        if _DOC_TAG.match(line):
            if line.startswith("</"):
                if current is not None:
                    articles.append("\n".join(current).strip())
                current = None
            else:
                current = []
            continue
        if current is not None:
            current.append(line.rstrip())
    return [a for a in articles if a]


def train_test_split(docs: list[str]) -> tuple[list[str], list[str]]:
    """The one corpus split: the first floor(n/2) documents train, the rest test."""
    half = len(docs) // 2
    return docs[:half], docs[half:]


@functools.lru_cache(maxsize=8)
def load_text(name: str) -> str:
    """The text of a named corpus or a UTF-8 file (see the module docstring for names)."""
    if name in ("wiki", "wiki:train", "wiki:test"):
        docs = split_wiki_articles(text_file("wiki").read_text(encoding="utf-8"))
        train, test = train_test_split(docs)
        docs = {"wiki": docs, "wiki:train": train, "wiki:test": test}[name]
        return "\n\n".join(docs)
    if name == "c4":
        lines = text_file("c4").read_text(encoding="utf-8").splitlines()
        return "\n\n".join(line.strip() for line in lines if line.strip())
    if name in HF_TEXTS:
        return _load_hf_text(name)
    path = Path(name)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"text file {name!r} is not UTF-8: {e}") from None
    raise ConfigError(f"unknown text {name!r}: use one of {', '.join(EMBEDDED + HF_TEXTS)} or a path to a UTF-8 file")


def _load_hf_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise InputError(f"text {name!r} needs the `datasets` package (pip install 'requant[eval]')") from None
    _, corpus, split = name.split(":")
    try:
        if corpus == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            ds = datasets.load_dataset(
                "allenai/c4",
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation",
            )
    except Exception as e:  # datasets raises many types when offline and uncached
        raise InputError(f"text {name!r} is not in the local datasets cache: {str(e).splitlines()[0]}") from None
    return "\n\n".join(ds["text"])


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D int64 tensor (the tokenizer's default special tokens)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


def _check_len(ids: torch.Tensor, seqlen: int, name: str) -> None:
    if seqlen < 2:
        raise ConfigError(f"seqlen {seqlen} is too small; use at least 2 tokens")
    if ids.numel() < seqlen:
        raise InputError(f"text {name!r} has {ids.numel()} tokens, too short for one window of {seqlen}")


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, *, name: str = "text"
) -> torch.Tensor:
    """n random windows (nsamples, seqlen) of the token stream, GPTQ-style, reproducible from `seed`."""
    if nsamples < 1:
        raise ConfigError(f"nsamples {nsamples} must be at least 1")
    _check_len(ids, seqlen, name)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None, *, name: str = "text") -> torch.Tensor:
    """Non-overlapping windows (k, seqlen) from the stream start (GPTQ protocol); `limit` keeps k first."""
    _check_len(ids, seqlen, name)
    k = ids.numel() // seqlen
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit {limit} must be at least 1")
        k = min(k, limit)
    return ids[: k * seqlen].view(k, seqlen)


def text_windows(
    tokenizer: object,
    name: str,
    seqlen: int,
    *,
    nsamples: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> torch.Tensor:
    """Windows of a named text: random calibration windows if `nsamples` is given, else eval windows."""
    ids = tokenize(tokenizer, load_text(name))
    if nsamples is not None:
        return calibration_windows(ids, nsamples, seqlen, seed, name=name)
    return eval_windows(ids, seqlen, limit, name=name)
