"""An offline multiple-choice task for `requant eval --tasks`: cloze items cut from the embedded wiki:test text.

No standard benchmark's data ships with requant and nothing may be downloaded, so this writes a small
LAMBADA-like task as lm-eval YAML + JSONL: each item is the 48 words before a sentence's last word, and the
choices are that word (without its full stop) and three distractors drawn from the text's other words of 4+
letters, the right one at a random position. It is synthetic and small: use it to compare a model with its
quantized checkpoints, not with published accuracies.

Usage: python benchmarks/wiki_cloze.py DIR [--items 200] [--seed 0]
       requant eval MODEL --tasks wiki_cloze --task-path DIR --json
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

CONTEXT_WORDS = 48
TASK = "wiki_cloze"


def cloze_items(text: str, n: int, seed: int) -> list[dict]:
    """`n` items {context, choices, answer} from sentence-final words of `text` (seeded, in text order)."""
    rng = random.Random(seed)
    words = text.split()
    vocab = sorted({w for w in words if re.fullmatch(r"[a-z]{4,}", w)})
    # A sentence's last word: lower-case letters and a full stop, with enough words before it.
    spots = [i for i in range(CONTEXT_WORDS, len(words)) if re.fullmatch(r"[a-z]{4,}\.", words[i])]
    items = []
    for i in sorted(rng.sample(spots, min(n, len(spots)))):
        answer = words[i][:-1]
        choices = rng.sample([w for w in rng.sample(vocab, 8) if w != answer], 3)
        pos = rng.randrange(4)
        choices.insert(pos, answer)
        items.append({"context": " ".join(words[i - CONTEXT_WORDS : i]), "choices": choices, "answer": pos})
    return items


def main() -> None:
    from requant.data import load_text
    from requant.eval.lmeval import write_choice_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for the task's YAML and JSONL (give it to --task-path)")
    ap.add_argument("--items", type=int, default=200, help="number of items (default: 200)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the item and distractor draws (default: 0)")
    args = ap.parse_args()
    items = cloze_items(load_text("wiki:test"), args.items, args.seed)
    yaml = write_choice_task(args.out, TASK, items)
    print(f"wrote {len(items)} items to {yaml.with_suffix('.jsonl')}")


if __name__ == "__main__":
    main()
