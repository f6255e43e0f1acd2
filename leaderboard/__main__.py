"""`python -m leaderboard --results DIR --out DIR`: build the site and print index.html's path."""
from __future__ import annotations

import argparse
import sys

from leaderboard.build import build_site


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the site, print the index path; 2 when the results folder is missing."""
    parser = argparse.ArgumentParser(prog="python -m leaderboard", description=__doc__)
    parser.add_argument("--results", required=True, help="folder of per-cell result Parquet files")
    parser.add_argument("--out", required=True, help="folder to write the site (index.html, settings/, cells/, data.json, data.csv)")
    args = parser.parse_args(argv)
    try:
        index = build_site(args.results, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
