"""``gpusq demo``: the offline end-to-end demo on MNIST-5k (``gpusq.demo``)."""

from __future__ import annotations

import argparse

from gpusq import demo
from gpusq.outdir import DEMO_ENTRIES, check_out_dir, is_demo_output


def cli_main(argv: list[str], prog: str = "gpusq demo", command: str = "demo") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=demo.__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpusq-demo", help="new or empty directory (or see --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in --out")
    ap.add_argument("--teacher-epochs", type=float, default=40)
    ap.add_argument("--stage1-epochs", type=float, default=3)
    ap.add_argument("--stage2-epochs", type=float, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    clear = check_out_dir(a.out, overwrite=a.overwrite, entries=DEMO_ENTRIES, recognise=is_demo_output,
                          what="a gpusq demo output", can_resume=False)
    clear()
    demo.run_demo(a.out, a.teacher_epochs, a.stage1_epochs, a.stage2_epochs, seed=a.seed, progress=not a.quiet)
    return 0
