"""The "records" table: whole recordings through ``service.recording`` against glued windows.

Several minutes of each validation record (first lead, its 130 Hz high-passed reference) with
validation noise (the mixture of bw, em and ma) scaled to 0 and 6 dB over the whole stretch:

- ``noisy``: whole-record SNR improvement (clean and estimate scored without their means) of the
  record path and of non-overlapping windows glued together, on the span the glued windows cover;
- ``rates``: the same noisy stretches sent at 250, 360 and 500 Hz (resampled from 130 Hz with
  the service's own resampler), answered at that rate, scored at 130 Hz;
- ``clean``: the reference sent with no noise: how close each path stays to it, the error
  within ±0.25 s of window boundaries over the error elsewhere (seams show as a ratio above 1),
  and the error in the first and last second over the error between them (the ends).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.data import NOISE_TYPES, Corpus
from export.metrics import snr_db
from export.windows import _unit, scale_to_snr
from service import recording
from service.contract import SAMPLING_RATE_HZ, WINDOW
from service.engine import Engine

SNR_DB = (0, 6)
RATES = (250, 360, 500)
SEAM_S = 0.25  # each side of a boundary
END_S = 1.0  # at each end of a stretch
SKIP_S = 30.0
SHIFT = recording.HOP // 2  # the record path's boundaries then fall mid-window, the glued ones apart


def _stretches(corpus: Corpus, minutes: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(record, clean, unit-power noise) per validation record long enough for ``minutes``; the
    clean signal runs ``SHIFT`` samples longer than the noise (``_seam_ratio``).

    Each stretch starts ``SKIP_S`` into its record: the reference, high-passed forwards and
    backwards over the whole record, is padded by reflection at the record's own ends, which
    would favour a path that pads the same way over one that sees the signal as it is."""
    n = int(minutes * 60 * SAMPLING_RATE_HZ) // WINDOW * WINDOW
    skip, extra = int(SKIP_S * SAMPLING_RATE_HZ), SHIFT
    noise = sum(_unit(corpus.noise_validation[kind][0][:n].astype(np.float64)) for kind in NOISE_TYPES)
    return [
        (r.name, r.signals[0][skip : skip + n + extra].astype(np.float64), noise)
        for r in corpus.validation
        if r.signals[0].size >= skip + n + extra
    ]


def _runner(engine: Engine) -> recording.Runner:
    return lambda windows: engine.denoise(windows, input_units=True)


def glued(engine: Engine, x: np.ndarray) -> np.ndarray:
    """Non-overlapping windows, each restored with its own μ and σ, end to end."""
    return engine.denoise(x.reshape(-1, WINDOW), input_units=True).reshape(-1)


def _gain(clean: np.ndarray, noisy: np.ndarray, estimate: np.ndarray) -> float:
    centred = lambda x: x - x.mean()
    return float(snr_db(centred(clean), centred(estimate)) - snr_db(centred(clean), centred(noisy)))


def _rms(e: np.ndarray) -> float:
    return float(np.sqrt(np.mean(e**2)))


def _seam_ratio(error: np.ndarray, shifted: np.ndarray, boundaries: np.ndarray) -> float:
    """The error within ``SEAM_S`` of ``boundaries`` over the error at the same samples of a run
    that started ``SHIFT`` samples later, where its boundaries fall elsewhere: a seam shows as a
    ratio above 1. The same samples on both sides, because the error follows the beats, and a
    steady rhythm keeps its beats at the same place between boundaries 5 s apart (six beats at
    72 per minute), which a comparison with the samples away from boundaries takes for a seam."""
    half = int(SEAM_S * SAMPLING_RATE_HZ)
    near = np.array([i for b in boundaries if SHIFT + half <= b for i in range(b - half, b + half)], dtype=int)
    if not near.size:  # one window: no boundary to measure
        return float("nan")
    return _rms(error[near]) / _rms(shifted[near - SHIFT])


def _end_ratio(error: np.ndarray) -> float:
    end = int(END_S * SAMPLING_RATE_HZ)
    return _rms(np.r_[error[:end], error[-end:]]) / _rms(error[end:-end])


def _clean_errors(engine: Engine, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The record path's and the glued windows' errors on ``clean`` sent with no noise."""
    target = clean - clean.mean()
    record = recording.denoise(clean, SAMPLING_RATE_HZ, _runner(engine))
    stitched = glued(engine, clean)
    return record - target, stitched - stitched.mean() - target


def evaluate_records(engine: Engine, corpus: Corpus, minutes: float = 5.0) -> dict:
    run = _runner(engine)
    rows = {"noisy": [], "rates": [], "clean": []}
    for name, longer, noise in _stretches(corpus, minutes):
        clean = longer[: len(noise)]
        for snr in SNR_DB:
            noisy = clean + scale_to_snr(clean, noise, snr)
            record = recording.denoise(noisy, SAMPLING_RATE_HZ, run)
            rows["noisy"].append(
                {
                    "record": name,
                    "snr_in_db": snr,
                    "record_gain_db": _gain(clean, noisy, record),
                    "glued_gain_db": _gain(clean, noisy, glued(engine, noisy)),
                }
            )
            for rate in RATES:
                sent = recording.resample(noisy, SAMPLING_RATE_HZ, rate, round(len(noisy) * rate / SAMPLING_RATE_HZ))
                back = recording.resample(recording.denoise(sent, rate, run), rate, SAMPLING_RATE_HZ, len(noisy))
                rows["rates"].append(
                    {
                        "record": name,
                        "snr_in_db": snr,
                        "rate_hz": rate,
                        "gain_db": _gain(clean, noisy, back),
                        "gain_at_130_db": _gain(clean, noisy, record),
                    }
                )
        later = longer[-len(noise) :]
        (record_error, glued_error), (record_later, glued_later) = (
            _clean_errors(engine, clean),
            _clean_errors(engine, later),
        )
        rows["clean"].append(
            {
                "record": name,
                "record_rmse": _rms(record_error),
                "glued_rmse": _rms(glued_error),
                "record_seam_ratio": _seam_ratio(
                    record_error, record_later, np.arange(recording.HOP, len(clean), recording.HOP)
                ),
                "glued_seam_ratio": _seam_ratio(glued_error, glued_later, np.arange(WINDOW, len(clean), WINDOW)),
                "record_end_ratio": _end_ratio(record_error),
                "glued_end_ratio": _end_ratio(glued_error),
            }
        )
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))
    summary = {
        "records": len(rows["clean"]),
        "minutes_each": minutes,
        "hop": recording.HOP,
        "noisy": {
            f"{snr}_db": {
                "record_gain_db": mean([r for r in rows["noisy"] if r["snr_in_db"] == snr], "record_gain_db"),
                "glued_gain_db": mean([r for r in rows["noisy"] if r["snr_in_db"] == snr], "glued_gain_db"),
            }
            for snr in SNR_DB
        },
        "rates": {
            str(rate): {
                "gain_db": mean([r for r in rows["rates"] if r["rate_hz"] == rate], "gain_db"),
                "max_gap_to_130_db": float(
                    max(abs(r["gain_db"] - r["gain_at_130_db"]) for r in rows["rates"] if r["rate_hz"] == rate)
                ),
            }
            for rate in RATES
        },
        "clean": {
            key: mean(rows["clean"], key)
            for key in (
                "record_rmse",
                "glued_rmse",
                "record_seam_ratio",
                "glued_seam_ratio",
                "record_end_ratio",
                "glued_end_ratio",
            )
        }
        | {"max_record_seam_ratio": float(max(r["record_seam_ratio"] for r in rows["clean"]))},
    }
    noisy_ok = all(s["record_gain_db"] >= s["glued_gain_db"] for s in summary["noisy"].values())
    rates_ok = all(s["max_gap_to_130_db"] <= 0.5 for s in summary["rates"].values())
    clean_ok = summary["clean"]["record_rmse"] <= summary["clean"]["glued_rmse"]
    summary["targets_met"] = bool(
        noisy_ok and rates_ok and clean_ok and summary["clean"]["max_record_seam_ratio"] <= 1.2
    )
    return {"summary": summary, **rows}


def records_table(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"Whole records ({s['records']} validation records, {s['minutes_each']:g} min each, hop {s['hop']}):",
        "| input SNR | ΔSNR record | ΔSNR glued windows |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k.replace('_', ' ')} | {v['record_gain_db']:.2f} | {v['glued_gain_db']:.2f} |"
        for k, v in s["noisy"].items()
    ]
    lines += [
        f"at {rate} Hz: ΔSNR {v['gain_db']:.2f} dB, largest gap to the 130 Hz path {v['max_gap_to_130_db']:.3f} dB"
        for rate, v in s["rates"].items()
    ]
    c = s["clean"]
    lines.append(
        f"clean input: RMSE record {c['record_rmse']:.4f} vs glued {c['glued_rmse']:.4f} mV; error near boundaries / "
        f"elsewhere: record {c['record_seam_ratio']:.2f} (worst {c['max_record_seam_ratio']:.2f}), glued {c['glued_seam_ratio']:.2f}; "
        f"error in the first and last second / between: record {c['record_end_ratio']:.2f}, glued {c['glued_end_ratio']:.2f}; "
        f"targets met: {s['targets_met']}"
    )
    return "\n".join(lines)


def seam_figure(engine: Engine, corpus: Corpus, out: Path) -> None:
    """30 s across three boundaries of glued windows: noisy (0 dB), clean, glued and record output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, longer, noise = _stretches(corpus, 2.0)[0]
    clean = longer[: len(noise)]
    noisy = clean + scale_to_snr(clean, noise, 0)
    record = recording.denoise(noisy, SAMPLING_RATE_HZ, _runner(engine))
    stitched = glued(engine, noisy)
    part = slice(WINDOW + WINDOW // 2 - 4 * SAMPLING_RATE_HZ, WINDOW + WINDOW // 2 + 26 * SAMPLING_RATE_HZ)
    t = np.arange(part.start, part.stop) / SAMPLING_RATE_HZ
    fig, ax = plt.subplots(figsize=(14, 4))
    ax.plot(t, noisy[part] - noisy.mean(), color="0.75", lw=0.7, label="noisy (0 dB)")
    ax.plot(t, clean[part] - clean.mean(), color="k", lw=1.0, label="clean reference")
    ax.plot(t, stitched[part], color="tab:orange", lw=0.9, label="glued windows (units=input)")
    ax.plot(t, record[part], color="tab:blue", lw=0.9, label="/denoising/record")
    for b in range(2 * WINDOW, part.stop, WINDOW):
        ax.axvline(b / SAMPLING_RATE_HZ, color="tab:red", ls=":", lw=0.8)
    ax.set_title(f"{name}: 30 s across three window boundaries (dotted)")
    ax.set_xlabel("s")
    ax.set_ylabel("mV")
    ax.legend(loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
