"""``dinoreg batch PAIRS.csv -o OUTDIR``: many registrations, resumable, local workers or Dask.

Thin: parses arguments and shows a progress bar over pairs; the work is ``batch.run_batch``.
Exit status 0 when every pair is registered, 1 when some failed (reasons in OUTDIR/summary.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dinoreg.app.output_policy import BATCH, check_output_target
from dinoreg.cli.arguments import parse_params
from dinoreg.errors import InputError


def add_batch_command(sub: Any) -> None:
    batch = sub.add_parser("batch", help="register every pair of a CSV table (resumable; local workers or Dask)",
                           description="Columns: fixed, moving, and optionally fixed_mask, moving_mask, fixed_labels, "
                           "moving_labels, method, preset (relative paths are relative to the table). One folder "
                           "per pair in OUTDIR; pairs with a report.json there are skipped; summary.csv and "
                           "summary.md list every pair and the failures.")
    batch.add_argument("pairs", help="CSV table of pairs (header line: fixed,moving,...)")
    batch.add_argument("-o", "--output", required=True, help="output folder (one sub-folder per pair)")
    batch.add_argument("--method", default="auto", help="method for rows without a method column (default auto)")
    batch.add_argument("--preset", help="preset for rows without a preset column")
    batch.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="override one method parameter for every pair (repeatable)")
    batch.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment stage")
    batch.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where each worker computes")
    batch.add_argument("--workers", type=int, default=default_workers(),
                       help="local worker processes (default: half the CPU cores, at least 1)")
    batch.add_argument("--scheduler", metavar="ADDRESS",
                       help="Dask distributed scheduler (e.g. tcp://host:8786) instead of local workers; "
                       "OUTDIR and the input files must be reachable from the workers at the same paths")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(func=command_batch)


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


def command_batch(args: argparse.Namespace) -> int:
    from dinoreg.app.batch import PATH_COLUMNS, BatchSettings, read_pairs, run_batch  # lazy: not needed to start dinoreg

    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: give at least 1")
    pairs = read_pairs(args.pairs, args.method, args.preset)
    inputs = [args.pairs] + [getattr(pair, column) for pair in pairs for column in PATH_COLUMNS]
    check_output_target(args.output, inputs, kind=BATCH)  # the table is an input too
    settings = BatchSettings(params=parse_params(args.param), use_affine=not args.no_affine, device=args.device)
    bar = None
    if not args.quiet:
        from tqdm import tqdm  # lazy: only when a terminal bar is shown

        bar = tqdm(total=len(pairs), unit="pair", file=sys.stderr)

    def on_result(row: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{row['pair']}: {row['status']}", refresh=True)

    try:
        rows = run_batch(pairs, args.output, settings, args.workers, args.scheduler, on_result)
    finally:
        if bar is not None:
            bar.close()
    failed = [row for row in rows if not row["status"].startswith("ok")]
    for row in failed:
        print(f"dinoreg: pair {row['pair']} failed: {row['reason']}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} of {len(rows)} pairs registered; summary in "
          f"{os.path.join(args.output, 'summary.md')}", file=sys.stderr)
    return 1 if failed else 0
