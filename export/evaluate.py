"""`python -m export.evaluate --model M.onnx`: quality table, figures and the targets' verdict.

Runs the ONNX model through the service's own engine (so what is measured is what is served) on
validation windows that training never saw, next to a 0.5–40 Hz band-pass baseline on the very
same windows, over noise type {bw, em, ma, mixture} × input SNR {−6, 0, 6, 12} dB. A second
table scores the same way noise unlike the three recordings (``evaluate_families``), a third
whole recordings against glued windows (``export.records``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import signal

from export import manifest
from export.cli import corpus_or_exit, model_or_exit
from export.data import Corpus
from export.families import TRAINED
from export.metrics import bandpass, scores
from export.records import evaluate_records, records_table, seam_figure
from export.windows import family_grid, validation_grid
from service.contract import WINDOW
from service.engine import Engine

EVAL_SEED = 7  # differs from training's validation seed: the checkpoint was chosen on those windows


def evaluate(engine: Engine, corpus: Corpus, per_case: int) -> dict:
    """Per-case scores for model and baseline, and the summary the targets are judged on."""
    cases = _cases(engine, validation_grid(corpus, per_case, seed=EVAL_SEED))
    gain = [c["model"]["snr_improvement_db"] for c in cases]
    base = [c["bandpass"]["snr_improvement_db"] for c in cases]
    summary = {
        "windows_per_case": per_case,
        "mean_snr_improvement_db": float(np.mean(gain)),
        "bandpass_mean_snr_improvement_db": float(np.mean(base)),
        "margin_over_bandpass_db": float(np.mean(gain) - np.mean(base)),
        "cases_better_than_bandpass": int(sum(g > b for g, b in zip(gain, base))),
        "min_snr_out_at_12db": float(min(c["model"]["snr_out_db"] for c in cases if c["snr_in_db"] == 12)),
    }
    summary["targets_met"] = bool(
        summary["mean_snr_improvement_db"] >= 12
        and summary["margin_over_bandpass_db"] >= 6
        and summary["cases_better_than_bandpass"] == len(cases)
        and summary["min_snr_out_at_12db"] >= 20
    )
    return {"summary": summary, "cases": cases}


def evaluate_families(engine: Engine, corpus: Corpus, per_case: int) -> dict:
    """The same scores with the synthetic noise families and reversed `em` (``family_grid``): how
    the model meets noise other than the three recordings, above all the families training never
    drew (``held_out``)."""
    cases = _cases(engine, family_grid(corpus, per_case, seed=EVAL_SEED))
    for case in cases:
        case["held_out"] = case["noise"] not in TRAINED
    summary = {}
    for name, held_out in (("held_out", True), ("trained", False)):
        chosen = [c for c in cases if c["held_out"] == held_out]
        summary[name] = {
            "mean_snr_improvement_db": float(np.mean([c["model"]["snr_improvement_db"] for c in chosen])),
            "bandpass_mean_snr_improvement_db": float(np.mean([c["bandpass"]["snr_improvement_db"] for c in chosen])),
            "cases_better_than_bandpass": int(
                sum(c["model"]["snr_improvement_db"] > c["bandpass"]["snr_improvement_db"] for c in chosen)
            ),
            "cases": len(chosen),
        }
    return {"summary": summary, "cases": cases}


def _cases(engine: Engine, grid: dict) -> list[dict]:
    """Model and band-pass scores for each (noise, input SNR) case of a grid."""
    cases = []
    for (kind, snr), (noisy, clean) in grid.items():
        model = scores(noisy, clean, engine.denoise(noisy, input_units=True))
        cases.append(
            {"noise": kind, "snr_in_db": snr, "model": model, "bandpass": scores(noisy, clean, bandpass(noisy))}
        )
    return cases


def table(result: dict) -> str:
    s = result["summary"]
    return _rows(result["cases"]) + (
        f"\nmean ΔSNR {s['mean_snr_improvement_db']:.2f} dB (band-pass {s['bandpass_mean_snr_improvement_db']:.2f} dB, "
        f"margin {s['margin_over_bandpass_db']:.2f} dB); better than band-pass in {s['cases_better_than_bandpass']}/16; "
        f"min SNR out at +12 dB {s['min_snr_out_at_12db']:.2f} dB; targets met: {s['targets_met']}"
    )


def family_table(result: dict) -> str:
    lines = [_rows(result["cases"])]
    for name, s in result["summary"].items():
        lines.append(
            f"{name.replace('_', ' ')} families: mean ΔSNR {s['mean_snr_improvement_db']:.2f} dB "
            f"(band-pass {s['bandpass_mean_snr_improvement_db']:.2f} dB); better than band-pass in "
            f"{s['cases_better_than_bandpass']}/{s['cases']}"
        )
    return "\n".join(lines)


def _rows(cases: list[dict]) -> str:
    head = "| noise | SNR in | ΔSNR model | ΔSNR band-pass | SNR out model | RMSE model (mV) | PRD model (%) | cos model | cos band-pass |"
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for c in cases:
        m, b = c["model"], c["bandpass"]
        name = c["noise"] + (" (held out)" if c.get("held_out") else "")
        rows.append(
            f"| {name} | {c['snr_in_db']} dB | {m['snr_improvement_db']:.2f} | {b['snr_improvement_db']:.2f} | "
            f"{m['snr_out_db']:.2f} | {m['rmse']:.4f} | {m['prd_percent']:.1f} | {m['cosine']:.3f} | {b['cosine']:.3f} |"
        )
    return "\n".join(rows) + "\n"


def _polar(path: Path) -> tuple[np.ndarray, str]:
    """The Polar H10 strip's ECG column (the 40 s strip has time in its first column)."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    unit = "mV" if "mV" in path.read_text().splitlines()[0] else "µV"
    return data[:, -1], unit


def denoise_strip(engine: Engine, x: np.ndarray) -> np.ndarray:
    """Denoise a long strip window by window (the tail shorter than a window is dropped)."""
    n = len(x) // WINDOW * WINDOW
    return engine.denoise(x[:n].reshape(-1, WINDOW), input_units=True).reshape(-1)


def r_peaks(x: np.ndarray, fs: float = 130.0) -> np.ndarray:
    """A plain R-peak detector (5–25 Hz band energy), for reference-free before/after checks."""
    sos = signal.butter(2, [5, 25], btype="bandpass", fs=fs, output="sos")
    energy = np.abs(signal.sosfiltfilt(sos, x))
    peaks, _ = signal.find_peaks(energy, height=0.3 * np.percentile(energy, 99), distance=int(0.3 * fs))
    return peaks


def beat_agreement(before: np.ndarray, after: np.ndarray, tolerance: int = 8) -> dict:
    """Beats found in both (within ±60 ms at 130 Hz) over those found in either."""
    matched = sum(np.min(np.abs(after - b)) <= tolerance for b in before) if len(after) else 0
    return {
        "beats_before": int(len(before)),
        "beats_after": int(len(after)),
        "matched": int(matched),
        "f1": float(2 * matched / max(1, len(before) + len(after))),
    }


def figures(engine: Engine, corpus: Corpus, data: Path, out_dir: Path) -> dict:
    """PNG figures of validation windows and of the real Polar H10 strips; returns the beat checks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = validation_grid(corpus, 1, seed=EVAL_SEED)
    picks = [("bw", 0), ("em", 6), ("ma", 0), ("mixture", -6)]
    fig, axes = plt.subplots(len(picks), 1, figsize=(12, 2.6 * len(picks)), sharex=True)
    t = np.arange(WINDOW) / 130
    for ax, key in zip(axes, picks):
        noisy, clean = grid[key]
        ax.plot(t, noisy[0], color="0.7", lw=0.8, label="noisy")
        ax.plot(t, bandpass(noisy)[0], color="tab:orange", lw=0.8, label="band-pass 0.5–40 Hz")
        ax.plot(t, clean[0], color="k", lw=1.0, label="clean")
        ax.plot(t, engine.denoise(noisy, input_units=True)[0], color="tab:blue", lw=1.0, label="denoised")
        ax.set_title(f"{key[0]} noise at {key[1]} dB input SNR (validation record)")
        ax.set_ylabel("mV")
    axes[0].legend(loc="upper right", ncol=4)
    axes[-1].set_xlabel("s")
    fig.tight_layout()
    fig.savefig(out_dir / "examples.png", dpi=110)
    plt.close(fig)

    checks = {}
    for name, seconds in (("cycling_15min", 30), ("rest_40s", 30)):
        path = data / "polar_h10" / f"{name}.csv"
        if not path.exists():
            continue
        raw, unit = _polar(path)
        clean = denoise_strip(engine, raw)
        checks[name] = beat_agreement(r_peaks(raw[: len(clean)]), r_peaks(clean))
        start = len(clean) // 2 // WINDOW * WINDOW if name.startswith("cycling") else 0
        part = slice(start, start + seconds * 130)
        fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
        tt = np.arange(part.stop - part.start) / 130
        axes[0].plot(tt, raw[part], color="0.4", lw=0.8)
        axes[0].set_title(f"Polar H10 {name}: as recorded")
        axes[1].plot(tt, clean[part], color="tab:blue", lw=0.9)
        axes[1].set_title("denoised")
        for ax in axes:
            ax.set_ylabel(unit)
        axes[1].set_xlabel("s")
        fig.tight_layout()
        fig.savefig(out_dir / f"polar_h10_{name}.png", dpi=110)
        plt.close(fig)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/attention_unet.onnx"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out-dir", type=Path, default=Path("reports"), help="evaluation.json and PNG figures")
    parser.add_argument("--per-case", type=int, default=100, help="validation windows per noise × SNR case")
    parser.add_argument(
        "--manifest", type=Path, help="record the table in this manifest (e.g. artifacts/manifest.json)"
    )
    parser.add_argument(
        "--record-minutes", type=float, default=5.0, help="minutes of each record for the records table"
    )
    parser.add_argument(
        "--records-only",
        action="store_true",
        help="compute only the records table and merge it into the existing evaluation (JSON and manifest)",
    )
    args = parser.parse_args(argv)
    if args.record_minutes < 0.25:  # the glued-window comparison needs whole windows of every record
        parser.error("--record-minutes must be at least 0.25")
    engine = Engine(model_or_exit(args.model)).start()
    corpus = corpus_or_exit(args.data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"evaluation-{args.model.stem}.json"
    records = evaluate_records(engine, corpus, args.record_minutes)
    seam_figure(engine, corpus, args.out_dir / "records.png")
    if args.records_only:
        result = json.loads(out.read_text()) if out.exists() else {}
        if args.manifest:
            result = {**manifest.read(args.manifest).get("evaluation", {}).get(args.model.name, {}), **result}
    else:
        result = evaluate(engine, corpus, args.per_case)
        result["noise_families"] = evaluate_families(engine, corpus, args.per_case)
        result["polar_h10_beats"] = figures(engine, corpus, args.data, args.out_dir)
    result["records"] = records
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.manifest:  # the per-record rows stay in the report; the manifest keeps the summary
        shipped = {**result, "records": {"summary": records["summary"]}}
        manifest.update(args.manifest, {"evaluation": {args.model.name: shipped}})
    print(records_table(records))
    if args.records_only:
        return 0
    print(table(result))
    print(
        f"\nSynthetic noise families and reversed em, on the same validation records:\n{family_table(result['noise_families'])}"
    )
    print(f"Polar H10 beat agreement (raw vs denoised): {json.dumps(result['polar_h10_beats'])}")
    print(f"wrote {args.out_dir}/evaluation-{args.model.stem}.json and figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
