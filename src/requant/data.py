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

BOS: a window cut from the middle of a text has no BOS token, which models trained with one at the start of
every sequence see out of distribution. `window_bos` decides, from the tokenizer and the mode (auto, always,
never), whether every window starts with BOS; such a window is BOS + L-1 text tokens, so L stays the length.
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
# auto: BOS when the tokenizer adds one by default; always: whenever it has one; never: the plain token stream.
BOS_MODES = ("auto", "always", "never")


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


def tokenize(tokenizer: object, text: str, *, special_tokens: bool = True) -> torch.Tensor:
    """Token ids of `text` as a 1-D int64 tensor (with the tokenizer's default special tokens, unless told not)."""
    kw = {} if special_tokens else {"add_special_tokens": False}  # today's call, unchanged, by default
    ids = tokenizer(text, return_attention_mask=False, verbose=False, **kw)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


def adds_bos(tokenizer: object) -> bool:
    """Whether the tokenizer puts its BOS token before a text by default (e.g. Llama, Gemma; SmolLM2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    # Ask the tokenizer rather than read `add_bos_token`: a post-processor may add BOS without that attribute.
    ids = tokenize(tokenizer, "x")
    return ids.numel() > 0 and int(ids[0]) == bos


def window_bos(tokenizer: object, mode: str) -> int | None:
    """The token id every window starts with under BOS mode `mode` (auto, always, never), or None for none."""
    if mode not in BOS_MODES:
        raise ConfigError(f"bos {mode!r} is not allowed; use one of {', '.join(BOS_MODES)}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always" and bos is None:
        raise ConfigError("bos 'always' needs a BOS token and the tokenizer has none; use auto or never")
    if mode == "never" or (mode == "auto" and not adds_bos(tokenizer)):
        return None
    return int(bos)


def _check_len(ids: torch.Tensor, seqlen: int, name: str, bos: int | None = None) -> int:
    """The number of text tokens per window (seqlen, or seqlen - 1 after a BOS), once the stream is long enough."""
    if seqlen < 2:
        raise ConfigError(f"seqlen {seqlen} is too small; use at least 2 tokens")
    body = seqlen - (bos is not None)
    if ids.numel() < body:
        raise InputError(f"text {name!r} has {ids.numel()} tokens, too short for one window of {seqlen}")
    return body


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, *, name: str = "text", bos: int | None = None
) -> torch.Tensor:
    """n random windows (nsamples, seqlen) of the token stream, GPTQ-style, reproducible from `seed`; with a
    `bos` id each window is that token + seqlen-1 stream tokens."""
    if nsamples < 1:
        raise ConfigError(f"nsamples {nsamples} must be at least 1")
    body = _check_len(ids, seqlen, name, bos)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (nsamples,), generator=gen)
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos)


def eval_windows(
    ids: torch.Tensor, seqlen: int, limit: int | None = None, *, name: str = "text", bos: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows (k, seqlen) from the stream start (GPTQ protocol); `limit` keeps k first; with a
    `bos` id each window is that token + the next seqlen-1 stream tokens."""
    body = _check_len(ids, seqlen, name, bos)
    k = ids.numel() // body
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit {limit} must be at least 1")
        k = min(k, limit)
    return _with_bos(ids[: k * body].view(k, body), bos)


def text_windows(
    tokenizer: object,
    name: str,
    seqlen: int,
    *,
    nsamples: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    bos: str = "auto",
) -> torch.Tensor:
    """Windows of a named text: random calibration windows if `nsamples` is given, else eval windows; `bos`
    (auto, always, never) says whether each starts with the tokenizer's BOS token (`window_bos`)."""
    bos_id = window_bos(tokenizer, bos)
    # With a BOS per window the stream carries no special tokens (a BOS-adding tokenizer would put one more at
    # the text start); without, it is today's stream with the tokenizer's defaults.
    ids = tokenize(tokenizer, load_text(name), special_tokens=bos_id is None)
    if nsamples is not None:
        return calibration_windows(ids, nsamples, seqlen, seed, name=name, bos=bos_id)
    return eval_windows(ids, seqlen, limit, name=name, bos=bos_id)
