"""``tyr export RUN --out DIR``: the command line over ``export_run``."""

from __future__ import annotations

import argparse

from tyr.export.run import export_run
from tyr.export.writer import FORMATS


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, format=args.format, force=args.force)
    print(f"[tyr] exported {args.run} ({args.format}) to {out}")
    return 0


def add_export_parser(sub) -> argparse.ArgumentParser:
    """Register `tyr export RUN --out DIR [--format hf|dense-masked] [--force]`."""
    p = sub.add_parser(
        "export",
        help="write a finished run's pruned model as a Hugging Face folder",
        description="Write the final pruned model of a finished `tyr run` as a Hugging Face folder.",
    )
    p.add_argument("run", help="run directory (the --out of `tyr run`)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: compact weights (default); dense-masked: original shapes with pruned weights zeroed",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)
    return p
