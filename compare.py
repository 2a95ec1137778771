"""Compare finished runs: ``python compare.py RUN_DIR_OR_SWEEP_DIR... [--out DIR]``.

Writes report.md, report.html and PNG plots (accuracy against epoch and against training
time, parameters against accuracy) from each run's results.json and metrics.csv.
"""
import argparse
import sys
from pathlib import Path

from vit.compare import find_runs, table_rows, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (holding results.json) or sweep directories")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    args = parser.parse_args()
    try:
        runs = find_runs(args.runs)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    written = write_report(runs, Path(args.out))
    for row in table_rows(runs):
        print(" | ".join(row))
    print(f"report: {written['markdown']} and {written['html']}")


if __name__ == "__main__":
    main()
