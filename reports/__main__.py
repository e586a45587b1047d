"""`python -m reports <sweep_root>`: rebuild a sweep's HTML report from its Parquet tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.build_report import build_report


def main(argv: list[str] | None = None) -> int:
    """Build the report and print the path of its index.html."""
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    parser.add_argument("sweep_root", type=Path, help="the sweep folder (holds spec.json and tables/)")
    args = parser.parse_args(argv)
    if not args.sweep_root.is_dir():
        parser.error(f"sweep_root {str(args.sweep_root)!r} is not a folder")
    print(build_report(args.sweep_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
