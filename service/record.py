"""``python -m service.record IN OUT --rate 250``: denoise a recording file in this process, no server.

For archives of recordings: IN holds one column of samples, as CSV (a header line is kept) or
``.npy``; OUT gets the denoised recording in the same form, as long as IN, in its units with the
baseline removed, exactly as ``POST /api/v1/denoising/record`` answers. The model, its manifest
check and the onnxruntime settings come from the same environment variables as the service's.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

from service import files, recording
from service.batcher import Batcher
from service.config import Config, ConfigError
from service.contract import SAMPLING_RATE_HZ
from service.model import model_version, start_engine
from service.process import StartupError, refuse
from service.validation import MAX_ABS

FORMATS = (".csv", ".npy")
CHUNK_WINDOWS = 64  # windows between progress updates


class BadFile(ValueError):
    """An input that is not one column of numbers; the message is one sentence."""


def read(path: Path) -> tuple[np.ndarray, str | None]:
    """The samples of ``path`` and its CSV header line, if it has one."""
    header = None
    try:
        if path.suffix == ".npy":
            # Mapped, not read: a header that declares more than the file holds fails here,
            # instead of allocating what it declares.
            samples = np.load(path, allow_pickle=False, mmap_mode="r")
        else:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # a spreadsheet's byte-order mark goes
            if lines and not _is_number(lines[0].split(",")[-1]):
                header, lines = lines[0], lines[1:]
            while lines and not lines[-1].strip():  # a file may end in blank lines
                lines.pop()
            blank = next((n for n, line in enumerate(lines) if not line.strip()), None)
            if blank is not None:  # a gap in time: dropped silently, the rows after it came back shifted
                row = blank + 1 + (header is not None)
                raise BadFile(f"{path} has an empty row (line {row}): a sample is missing there.")
            with warnings.catch_warnings():  # an empty file: said below, in one sentence
                warnings.simplefilter("ignore")
                samples = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
    except (ValueError, EOFError) as exc:
        raise BadFile(f"{path} is not a column of numbers ({exc or 'it is empty'}).") from None
    if not isinstance(samples, np.ndarray):  # an .npz archive under another name
        raise BadFile(f"{path} is not a column of numbers (it holds several arrays).")
    if samples.ndim == 2 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.number) or np.iscomplexobj(samples):
        raise BadFile(f"{path} must hold one column of real numbers (got {samples.dtype} of shape {samples.shape}).")
    samples = np.array(samples, dtype=np.float64)
    if not np.all(np.abs(samples) <= MAX_ABS):  # NaN fails too
        raise BadFile(f"{path} must hold finite numbers of magnitude at most {MAX_ABS:g}, as the API takes.")
    return samples, header


def write(path: Path, samples: np.ndarray, header: str | None) -> None:
    """Written beside ``path`` and renamed onto it: a write that fails leaves ``path`` as it was
    (it may be the input)."""
    with files.atomic_path(path) as tmp, open(tmp, "wb") as out:
        if path.suffix == ".npy":
            np.save(out, recording.compact(samples))
        else:
            np.savetxt(out, samples, fmt="%.7g", header=header or "", comments="")


def runner(batcher: Batcher, progress: Callable[[int, int], None]) -> recording.Runner:
    """Runs windows through the batcher a chunk at a time, reporting progress after each."""

    def run(windows: np.ndarray) -> np.ndarray:
        out = np.empty_like(windows)
        for start in range(0, len(windows), CHUNK_WINDOWS):
            out[start : start + CHUNK_WINDOWS] = batcher.denoise_many(windows[start : start + CHUNK_WINDOWS], True)
            progress(min(start + CHUNK_WINDOWS, len(windows)), len(windows))
        return out

    return run


def progress_bar(stream: TextIO) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        filled = 30 * done // total
        stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} windows")
        if done == total:
            stream.write("\n")
        stream.flush()

    return show


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.record", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="one column of samples: .csv or .npy")
    parser.add_argument("output", type=Path, help="where the denoised recording goes: .csv or .npy")
    parser.add_argument(
        "--rate", type=float, default=SAMPLING_RATE_HZ, help=f"sampling rate in Hz (default {SAMPLING_RATE_HZ})"
    )
    args = parser.parse_args(argv)
    for path in (args.input, args.output):
        if path.suffix not in FORMATS:
            parser.error(f"{path}: only {' and '.join(FORMATS)} files are read and written")
    if not recording.MIN_RATE_HZ <= args.rate <= recording.MAX_RATE_HZ:
        parser.error(f"--rate must be from {recording.MIN_RATE_HZ:g} to {recording.MAX_RATE_HZ:g} Hz")
    try:
        if not args.output.parent.is_dir():  # before the work, not after it
            raise BadFile(f"{args.output.parent} is not a folder: {args.output} cannot be written.")
        if args.output.is_dir():
            raise BadFile(f"{args.output} is a folder: the output must be a file.")
        samples, header = read(args.input)
        if len(samples) / args.rate < recording.MIN_SECONDS:
            raise BadFile(f"{args.input} holds {len(samples)} samples; at least {recording.MIN_SECONDS:g} s is needed.")
        config = Config.from_env()
        model_version(config)  # the model file checked against its manifest, as the service does
        engine = start_engine(config)
    except (OSError, BadFile, ConfigError, StartupError) as exc:
        return refuse(exc)
    batcher = Batcher(engine, config.batch_max_size, 0, config.batch_workers).start()
    try:
        clean = recording.denoise(samples, args.rate, runner(batcher, progress_bar(sys.stderr)))
    finally:
        batcher.close()
        engine.close()
    try:
        write(args.output, clean, header)
    except OSError as exc:
        return refuse(f"cannot write {args.output} ({exc.strerror or exc}).")
    print(f"wrote {args.output}: {len(clean)} samples at {args.rate:g} Hz", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
