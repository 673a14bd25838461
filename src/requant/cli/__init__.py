"""The `requant` command line: one module per command, each registering its parser and handler.

Every RequantError becomes one line on stderr and exit code 2; a real bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .. import distributed
from ..errors import RequantError
from ..progress import quiet_transformers, set_quiet

# Each module defines add_parser(subparsers) and run(args) -> int.
COMMAND_MODULES = ("quantize", "eval", "sensitivity", "inspect", "generate", "bench", "export", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="requant", description="Post-training quantization with PQI and ReQuant.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f".{name}", __name__)
        p = mod.add_parser(sub)
        p.set_defaults(handler=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(bool(getattr(args, "json", False)))
    try:
        with quiet_transformers():
            return args.handler(args)
    except RequantError as e:
        # Under torchrun every rank reports; say which one (the process group is gone by now, hence the env).
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
        print(f"requant: error{where}: {e}", file=sys.stderr)
        if distributed.is_broken():
            # A process group whose peer vanished can abort (SIGABRT) while Python tears it down at exit;
            # the error is printed, so leave now with the documented exit code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("requant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `requant inspect ... | head`: the reader left; stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def entry() -> None:
    """The process entry point (the `requant` script, `python -m requant`): here, and only here, a torchrun
    worker may end the process once its work is written (requant.distributed.finish)."""
    distributed.exit_at_finish()
    sys.exit(main())


if __name__ == "__main__":
    entry()
