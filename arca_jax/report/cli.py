"""Command line: ``arca-jax report RUN_DIR... --out DIR`` (also ``python -m arca_jax.report``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from arca_jax.report.figure import ReportError
from arca_jax.report.write import write_report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand's arguments to ``parser``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the report (created; report files overwritten)")
    parser.add_argument("--heatmap-run", metavar="NAME",
                        help="run whose sample the heatmap shows (default: the highest-rank "
                             "ARCA run with samples)")
    parser.add_argument("--heatmap-step", type=int, metavar="STEP",
                        help="only consider samples logged at this step")
    parser.add_argument("--heatmap-index", type=int, metavar="I",
                        help="pick this sample (Python index) instead of the latest "
                             "highest-reward one")
    parser.add_argument("--heatmap-max-tokens", type=int, default=256, metavar="N",
                        help="tokens drawn in heatmap.png (default 256; the HTML has all)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the subcommand: 0 on success, 2 for bad input, 1 when the report cannot be made."""
    try:
        paths = write_report(args.run_dirs, args.out, heatmap_run=args.heatmap_run,
                             heatmap_step=args.heatmap_step, heatmap_index=args.heatmap_index,
                             max_heatmap_tokens=args.heatmap_max_tokens)
    except ValueError as e:
        print(f"arca-jax report: error: {e}", file=sys.stderr)
        return 2
    except (ReportError, OSError) as e:
        print(f"arca-jax report: error: {e}", file=sys.stderr)
        return 1
    for note in paths.notes:
        print(f"arca-jax report: note: {note}", file=sys.stderr)
    print(f"wrote {paths.report_md}")
    for p in paths.files()[1:]:
        print(f"  {p}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``arca-jax report`` as a standalone command; returns the exit code."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="arca-jax report",
        description="Tables, curves and a credit heatmap from arca-jax run directories."))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message
        return int(e.code or 0)
    return run(args)
