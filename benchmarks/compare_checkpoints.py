"""Do two checkpoints hold the same model? Tensor by tensor (names, dtypes, values) and layer table.

    python benchmarks/compare_checkpoints.py A B [A2 B2 ...]

Format v0/v1 checkpoints are compared through their v2 form (`requant convert` them first). Raw file bytes are
reported too: two runs that wrote identical tensors can still differ there, because safetensors writes the
`__metadata__` map of a file in hash order. Exit code 1 when any pair holds different tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from requant.format.checkpoint import tensor_files

    out: dict[str, torch.Tensor] = {}
    for f in tensor_files(path):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open has no iteration
    return out


def compare(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    differ = sorted(k for k in ta.keys() & tb.keys() if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]))
    only = sorted(ta.keys() ^ tb.keys())
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qb = json.loads((b / "config.json").read_text())["quantization_config"]
    same_table = qa.get("layers") == qb.get("layers") and qa.get("config") == qb.get("config")
    raw = sorted(p.name for p in a.glob("*.safetensors") if (b / p.name).read_bytes() != p.read_bytes())
    print(
        f"{a} vs {b}: {len(ta)} tensors, {len(differ)} differ {differ[:3]}, {len(only)} in one only {only[:3]}, "
        f"layer table and config {'equal' if same_table else 'DIFFERENT'}; files with other raw bytes: {raw or 'none'}"
    )
    return not differ and not only and same_table


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    pairs = zip(argv[::2], argv[1::2], strict=True)
    ok = all([compare(Path(a), Path(b)) for a, b in pairs])
    print("same tensors" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
