"""Real recordings from ../shared/data: clean ECG references, noise records, and their split.

Everything is resampled to 130 Hz. A clean reference is its record high-passed at 0.5 Hz
(4th-order Butterworth, zero-phase) over the whole record, so the model learns to remove baseline
wander. Records are split by patient; each noise record is split by time.

The same corpus also travels as one packed file (``write_pack``, ``python -m export.pack``) for
machines without wfdb or the raw records; ``load_corpus`` reads either.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from service.contract import SAMPLING_RATE_HZ
from service.files import atomic_write

NOISE_TYPES = ("bw", "em", "ma")
VALIDATION_FRACTION = 0.2
NOISE_TRAIN_FRACTION = 0.75  # the first 75 % of each noise record trains, the rest validates
_HIGHPASS = signal.butter(4, 0.5, btype="highpass", fs=SAMPLING_RATE_HZ, output="sos")


@dataclass(frozen=True)
class Record:
    name: str  # e.g. "mitdb/100"
    group: str  # patient: records of one group stay on one side of the split
    signals: tuple[np.ndarray, ...]  # one clean reference per lead, float32, 130 Hz


@dataclass(frozen=True)
class Corpus:
    train: list[Record]
    validation: list[Record]
    noise_train: dict[str, np.ndarray]  # type → channels × samples, float32, 130 Hz
    noise_validation: dict[str, np.ndarray]

    def describe(self) -> dict:
        seconds = lambda recs: round(sum(s.size for r in recs for s in r.signals) / SAMPLING_RATE_HZ)
        return {
            "clean": "MIT-BIH Arrhythmia + QT Database, every lead, 130 Hz, high-passed at 0.5 Hz",
            "noise": "MIT-BIH Noise Stress Test bw/em/ma, both channels, 130 Hz",
            "train_records": [r.name for r in self.train],
            "validation_records": [r.name for r in self.validation],
            "train_lead_seconds": seconds(self.train),
            "validation_lead_seconds": seconds(self.validation),
            "noise_split": f"first {NOISE_TRAIN_FRACTION:.0%} of each noise record trains, the rest validates",
        }


def to_130hz(x: np.ndarray, fs: float) -> np.ndarray:
    """Polyphase resampling along the last axis (360 Hz: 13/36, 250 Hz: 13/25)."""
    up, down = SAMPLING_RATE_HZ, int(round(fs))
    g = np.gcd(up, down)
    return signal.resample_poly(x, up // g, down // g, axis=-1)


def clean_reference(x: np.ndarray, fs: float) -> np.ndarray:
    return signal.sosfiltfilt(_HIGHPASS, to_130hz(x, fs), axis=-1).astype(np.float32)


def patient_group(database: str, name: str) -> str:
    """QT excerpts selNNN of MIT-BIH record NNN share its patient, and so do MIT-BIH 201 and 202."""
    match = re.fullmatch(r"sel([12]\d\d)", name)
    number = match.group(1) if match else name if database == "mitdb" else None
    if number is None:
        return f"{database}/{name}"
    return "mitdb/201" if number == "202" else f"mitdb/{number}"


def is_validation(group: str) -> bool:
    """A fixed, seed-free split: the same group is on the same side on every machine."""
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % 1000 < VALIDATION_FRACTION * 1000


def _read(path: Path) -> tuple[np.ndarray, float]:
    import wfdb  # here, so that a machine given a packed corpus needs no wfdb

    record = wfdb.rdrecord(str(path))
    x = np.nan_to_num(record.p_signal.T.astype(np.float64))
    return x, float(record.fs)


def load_records(root: Path) -> list[Record]:
    records = []
    for database in ("mitdb", "qtdb"):
        for header in sorted((root / database).glob("*.hea")):
            x, fs = _read(header.with_suffix(""))
            clean = clean_reference(x, fs)
            records.append(Record(f"{database}/{header.stem}", patient_group(database, header.stem), tuple(clean)))
    return records


def load_noise(root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    train, validation = {}, {}
    for kind in NOISE_TYPES:
        x, fs = _read(root / "nstdb" / kind)
        x = to_130hz(x, fs).astype(np.float32)
        cut = int(x.shape[1] * NOISE_TRAIN_FRACTION)
        train[kind], validation[kind] = x[:, :cut], x[:, cut:]
    return train, validation


def load_corpus(root: str | Path) -> Corpus:
    """The corpus of a WFDB data folder, or of a file that ``write_pack`` wrote."""
    root = Path(root)
    if root.is_file():
        return read_pack(root)
    if not (root / "mitdb").is_dir() or not (root / "nstdb").is_dir():
        raise FileNotFoundError(f"no ECG data under {root} (expected mitdb/, qtdb/, nstdb/)")
    records = load_records(root)
    noise_train, noise_validation = load_noise(root)
    return Corpus(
        train=[r for r in records if not is_validation(r.group)],
        validation=[r for r in records if is_validation(r.group)],
        noise_train=noise_train,
        noise_validation=noise_validation,
    )


PACK_STEP_MV = 0.004
_PACK_FORMAT = "heartify-corpus/1"


def write_pack(corpus: Corpus, path: Path) -> None:
    """``corpus`` in one file: each signal as int16 first differences in 4 µV steps (the records'
    own ADC step is 5 µV, so nothing they resolve is lost), one ``.npy`` per signal in an
    xz-compressed tar, and a JSON index. Written atomically, as the manifest is."""
    arrays: dict[str, np.ndarray] = {}

    def records(side: str, recs: list[Record]) -> list[dict]:
        for i, record in enumerate(recs):
            for lead, x in enumerate(record.signals):
                arrays[f"{side}/{i}/{lead}.npy"] = _encode(x)
        return [{"name": r.name, "group": r.group, "leads": len(r.signals)} for r in recs]

    index = {
        "format": _PACK_FORMAT,
        "train": records("train", corpus.train),
        "validation": records("validation", corpus.validation),
    }
    for side in ("noise_train", "noise_validation"):
        noise = getattr(corpus, side)
        index[side] = sorted(noise)
        arrays.update({f"{side}/{kind}.npy": _encode(channels) for kind, channels in noise.items()})
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:xz") as tar:
        _add(tar, "index.json", json.dumps(index).encode())
        for name, array in arrays.items():
            _add(tar, name, _npy(array))
    atomic_write(path, packed.getvalue())


def read_pack(path: Path) -> Corpus:
    refused = ValueError(f"{path} is neither a data folder nor a corpus written by python -m export.pack")
    try:
        tar = tarfile.open(path, "r:xz")  # noqa: SIM115 (closed by the with block below)
    except tarfile.TarError:
        raise refused from None
    with tar:
        member = lambda name: tar.extractfile(name).read()  # type: ignore[union-attr]
        try:
            index = json.loads(member("index.json"))
        except KeyError:
            index = {}
        if index.get("format") != _PACK_FORMAT:
            raise refused
        array = lambda name: _decode(np.load(io.BytesIO(member(name)), allow_pickle=False))
        records = lambda side: [
            Record(r["name"], r["group"], tuple(array(f"{side}/{i}/{lead}.npy") for lead in range(r["leads"])))
            for i, r in enumerate(index[side])
        ]
        noise = lambda side: {kind: array(f"{side}/{kind}.npy") for kind in index[side]}
        return Corpus(records("train"), records("validation"), noise("noise_train"), noise("noise_validation"))


def _encode(x: np.ndarray) -> np.ndarray:
    steps = np.diff(np.round(np.asarray(x, np.float64) / PACK_STEP_MV).astype(np.int64), axis=-1, prepend=0)
    if np.abs(steps).max(initial=0) > np.iinfo(np.int16).max:
        raise ValueError("a signal changes by more than 131 mV from one sample to the next: not ECG in mV")
    return steps.astype(np.int16)


def _decode(steps: np.ndarray) -> np.ndarray:
    return (np.cumsum(steps.astype(np.int64), axis=-1) * PACK_STEP_MV).astype(np.float32)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
