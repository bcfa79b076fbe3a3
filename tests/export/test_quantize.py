"""int8 static quantization: QDQ graph, upsampling as Conv, a working model, the quality gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.onnx_export import parity_windows
from export.quantize import quality_gate, quantize

from .conftest import one_thread_engine

pytestmark = pytest.mark.slow  # exports, evaluates or trains a model


def test_quantized_model_is_qdq_per_channel_and_close_to_fp32(exported, tmp_path):
    out = tmp_path / "int8.onnx"
    quantize(exported, out, parity_windows(32, seed=3))
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "ConvTranspose" not in ops  # rewritten as Conv + reshape, so that it quantizes
    inits = {t.name: t for t in graph.initializer}
    per_channel = [
        n
        for n in graph.node
        if n.op_type == "DequantizeLinear" and len(inits.get(n.input[1], onnx.TensorProto()).dims) == 1
    ]
    assert per_channel  # weight scales are vectors: one per output channel
    windows = parity_windows(16, seed=4)
    fp32, int8 = one_thread_engine(exported).run(windows), one_thread_engine(out).run(windows)
    assert int8.shape == fp32.shape
    assert np.abs(int8 - fp32).mean() < 0.1 * np.abs(fp32).mean() + 1e-3


def _result(gains: list[float]) -> dict:
    return {
        "summary": {"mean_snr_improvement_db": float(np.mean(gains))},
        "cases": [{"model": {"snr_improvement_db": g}} for g in gains],
    }


def test_quality_gate_limits_mean_and_worst_case_loss():
    fp32 = _result([14.0] * 16)
    assert quality_gate(fp32, _result([13.8] * 16))[0]
    assert not quality_gate(fp32, _result([13.6] * 16))[0]  # mean loss 0.4 dB
    assert not quality_gate(fp32, _result([14.0] * 15 + [13.3]))[0]  # one case 0.7 dB worse
