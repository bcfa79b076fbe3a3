"""`python -m export.pack --out runs/corpus.tar.xz`: the training corpus in one file, for a
machine that has neither wfdb nor room for the raw records (a rented GPU machine, say).

The file holds what the data folder gives (130 Hz, high-passed, split; ``export.data.write_pack``
says how) in about a fifth of the records' size, and every command that takes ``--data`` reads it
in place of the folder. It is derived from the recordings: keep it out of the repository (the
default path is under the ignored ``runs/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.cli import corpus_or_exit
from export.data import write_pack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.pack", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the WFDB data folder")
    parser.add_argument("--out", type=Path, default=Path("runs/corpus.tar.xz"))
    args = parser.parse_args(argv)
    write_pack(corpus_or_exit(args.data), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
