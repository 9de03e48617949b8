"""The ``gpusq`` command: a thin dispatcher over the Python API.

Each subcommand is a module of this package (``gpusq.cli.<command>``, argument parsing and printing
only) exposing ``cli_main(argv, prog, command) -> int`` over the library's functions; modules are
imported only when their command runs, so ``gpusq --help`` stays fast. ``gpusq.cli.args`` holds the
spellings every command shares.
"""

from __future__ import annotations

import importlib
import sys

from gpusq.errors import GpusqError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gpusq.cli.demo", "offline end-to-end demo on MNIST-5k (train teacher, compress sparse/int8/int4)"),
    "train": ("gpusq.cli.train", "train or fine-tune a dense model (a teacher)"),
    "compress": ("gpusq.cli.train", "GPUSQ: 2:4 prune + KD fine-tune, then sparse-aware QAT with KD"),
    "eval": ("gpusq.cli.train", "top-1/top-5 of a checkpoint on a dataset"),
    "stats": ("gpusq.cli.stats", "parameters, size and bit-op accounting of a model under a recipe"),
    "recipes": ("gpusq.cli.recipes", "list the shipped recipes"),
    "bench": ("gpusq.cli.bench", "GPU speed: gpusq deployed vs FP32/TF32/BF16/FP8 baselines"),
    "deploy": ("gpusq.cli.deploy", "--warmup: search and cache a model's GPU kernels before serving it"),
    "export": ("gpusq.cli.export", "export a compressed model (ONNX with Q/DQ and 2:4 weights)"),
}


def _usage() -> str:
    lines = ["usage: gpusq COMMAND [options]   (gpusq COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from gpusq import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        from gpusq.errors import close_matches

        hint = close_matches(cmd, COMMANDS)
        print(f"gpusq: error: unknown command '{cmd}'" + (f" (did you mean: {hint}?)" if hint else ""),
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd][0])
        return int(module.cli_main(rest, prog=f"gpusq {cmd}", command=cmd) or 0)
    except GpusqError as e:
        print(f"gpusq {cmd}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"gpusq {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"gpusq {cmd}: error: GPU out of memory; try a smaller --batch-size", file=sys.stderr)
            return 3
        from gpusq.errors import InternalError

        if isinstance(e, InternalError):  # a bug: say so, then the traceback
            print(f"gpusq {cmd}: internal error (a bug in gpusq, please report it with the traceback below): {e}",
                  file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
