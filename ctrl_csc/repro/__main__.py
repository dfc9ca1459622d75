"""``ctrl-csc-repro``: train and evaluate every run of the suite, then write the tables.

    ctrl-csc-repro                          # the miniature: embedded data, CPU, ~39 min on 2 cores
    ctrl-csc-repro --smoke                  # every row for a few steps (CI)
    ctrl-csc-repro --only 'csc_ctrl_mnist*' # some rows (shell-style pattern on the run names)
    ctrl-csc-repro --report-only            # tables and figures from the runs already there
    ctrl-csc-repro --scale full --launcher slurm hydra.launcher.partition=gpu  # paper protocol

Runs already finished under ``--runs`` are skipped, so an interrupted suite continues.
Trailing ``KEY=VALUE`` arguments are Hydra overrides for every training run (e.g.
``dataset.root=...`` at full scale); ``--eval-override`` for every evaluation.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import shlex
import sys
import time
from pathlib import Path

from ctrl_csc.repro.report import write_report
from ctrl_csc.repro.runner import run_suite
from ctrl_csc.repro.suite import SCALES, evaluations, rows

log = logging.getLogger("ctrl_csc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ctrl-csc-repro", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--scale", choices=sorted(SCALES), default="miniature")
    p.add_argument("--smoke", action="store_true", help="every row for a few steps (CI)")
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="run directories (default outputs/repro/<scale>[_smoke])",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="tables and figures (default experiments/results for the miniature, "
        "<runs>/results otherwise)",
    )
    p.add_argument("--jobs", type=int, default=2, help="local sweeps side by side (default 2)")
    p.add_argument("--launcher", default=None, help="a Hydra launcher, e.g. slurm")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="PATTERN",
        help="run only the rows whose names match (repeatable)",
    )
    p.add_argument("--report-only", action="store_true", help="only write the tables")
    p.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for every training run"
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    scale = SCALES[args.scale]
    tag = args.scale + ("_smoke" if args.smoke else "")
    runs = args.runs or Path("outputs") / "repro" / tag
    if args.out is not None:
        out = args.out
    elif args.scale == "miniature" and not args.smoke:
        out = Path("experiments") / "results"
    else:
        out = runs / "results"
    suite = rows()
    if args.only:
        suite = [r for r in suite if any(fnmatch.fnmatch(r.name, pat) for pat in args.only)]
        if not suite:
            log.error(
                "--only %s matches no run; runs: %s", args.only, ", ".join(r.name for r in rows())
            )
            return 2
    command = "ctrl-csc-repro " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    failed = []
    if not args.report_only:
        summary = run_suite(
            suite,
            evaluations(suite),
            scale,
            runs,
            smoke=args.smoke,
            jobs=args.jobs,
            launcher=args.launcher,
            train_overrides=args.overrides,
            eval_overrides=args.eval_override,
        )
        failed = summary["failed_logs"]
    written = write_report(
        rows(),
        runs,
        out,
        command=command,
        scale=args.scale,
        smoke=args.smoke,
        wall_s=None if args.report_only else time.perf_counter() - t0,
    )
    log.info("wrote %d files to %s", len(written), out)
    if failed:
        log.error(
            "some runs failed; see %s (finished runs are kept and skipped next time)",
            ", ".join(map(str, failed)),
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
