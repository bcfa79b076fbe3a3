"""What the offline commands share on their command line: a missing data folder or model file,
or a data file that is no packed corpus, ends the command with one line on stderr and exit
status 1, not a traceback."""

from __future__ import annotations

from pathlib import Path

from export.data import Corpus, load_corpus


def corpus_or_exit(root: Path) -> Corpus:
    try:
        return load_corpus(root)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def model_or_exit(path: Path) -> Path:
    if not path.is_file():
        raise SystemExit(f"error: ONNX model not found: {path}")
    return path
