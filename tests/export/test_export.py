"""`python -m export`: strict loading, ONNX that passes the checker, parity, manifest, clean failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.__main__ import recorded_version
from export.checkpoint import CheckpointError, load_model
from export.manifest import update as update_manifest
from export.onnx_export import ParityError, check_parity, parity_windows

from .conftest import export_main, one_thread_engine, random_state_dict

pytestmark = pytest.mark.slow  # exports, evaluates or trains a model

# Tests whose subject is not the parity figure itself compare fewer windows than the default.
FEW = 8
FEW_ARGS = ["--parity-windows", str(FEW)]


def assert_one_sentence(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for word in words:
        assert word in last


@pytest.mark.parametrize("nesting", [None, "state_dict", "model_state_dict"])
def test_checkpoint_loads_strictly_bare_or_nested(tmp_path, nesting):
    state = random_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(state if nesting is None else {nesting: state, "epoch": 3}, path)
    model = load_model(path)
    assert not model.training
    assert torch.equal(model.state_dict()["final.weight"], state["final.weight"])


def test_onnx_model_is_valid_with_dynamic_batch_and_named_io(exported):
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "ecg" and out.name == "denoised"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 1300]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_export_records_parity_and_checksums_in_the_manifest(exported, checkpoint):
    manifest = json.loads((exported.parent / "manifest.json").read_text())
    entry = manifest["models"][exported.name]
    parity = entry["parity"]
    assert parity["windows"] == 16 and parity["batch_sizes"] == [1, 7, 64]
    assert 0 <= parity["mean_abs_diff"] <= parity["max_abs_diff"] <= 1e-4
    import hashlib

    assert entry["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert entry["opset"] >= 17
    assert manifest["input"]["sampling_rate_hz"] == 130 and manifest["input"]["shape"][-1] == 1300
    assert {"torch", "onnx", "onnxruntime"} <= manifest["versions"].keys()


def test_a_re_export_keeps_the_manifest_version_unless_given_one(exported, tmp_path):
    """The first export records version 1; later ones keep the recorded one unless given one."""
    first = json.loads((exported.parent / "manifest.json").read_text())["model_version"]
    path = tmp_path / "manifest.json"
    assert (first, recorded_version(path, None)) == (1, 1)
    update_manifest(path, {"model_version": 7})
    assert recorded_version(path, None) == 7
    assert recorded_version(path, 9) == 9


def test_onnxruntime_matches_pytorch_at_several_batch_sizes(exported, checkpoint):
    model = load_model(checkpoint)
    windows = parity_windows(64, seed=5)
    with torch.no_grad():
        expected = model(torch.from_numpy(windows)).numpy()
    engine = one_thread_engine(exported)
    for size in (1, 3, 64):  # 64: the largest batch the service runs by default
        got = np.concatenate([engine.run(windows[i : i + size]) for i in range(0, 64, size)])
        assert np.abs(got - expected).max() <= 1e-4


def test_a_perturbed_onnx_model_fails_parity(exported, checkpoint, tmp_path, capsys):
    proto = onnx.load(str(exported))
    (init,) = [t for t in proto.graph.initializer if t.name == "final.weight"]
    weights = numpy_helper.to_array(init).copy()
    weights += 0.01  # small, but far beyond float32 rounding
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ParityError):
        check_parity(load_model(checkpoint), bad, parity_windows(FEW))
    assert export_main(["--weights", str(checkpoint), "--out", str(bad), "--verify-only", *FEW_ARGS]) == 1
    assert_one_sentence(capsys.readouterr().err, "parity check failed")


def _wrong_keys(path: Path) -> None:
    state = random_state_dict()
    state["encoder1.weight"] = state.pop("enc1.conv.0.weight")
    torch.save(state, path)


def _wrong_shapes(path: Path) -> None:
    state = random_state_dict()
    state["final.weight"] = torch.zeros(1, 16, 1)
    torch.save({"model_state_dict": state}, path)


def _not_a_checkpoint(path: Path) -> None:
    path.write_bytes(b"this is not a checkpoint\n" * 10)


def _no_state_dict(path: Path) -> None:
    torch.save({"epoch": 3, "note": "weights missing"}, path)


@pytest.mark.parametrize(
    "make, words",
    [
        (_wrong_keys, ("does not match", "missing", "unexpected")),
        (_wrong_shapes, ("does not match", "final.weight")),
        (_not_a_checkpoint, ("not a readable PyTorch checkpoint",)),
        (_no_state_dict, ("no state dict",)),
    ],
)
def test_bad_checkpoints_fail_with_one_sentence_and_write_nothing(tmp_path, capsys, make, words):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(CheckpointError):
        load_model(path)
    out = tmp_path / "out" / "model.onnx"
    assert export_main(["--weights", str(path), "--out", str(out)]) == 1
    assert_one_sentence(capsys.readouterr().err, *words)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_missing_checkpoint_is_one_sentence(tmp_path, capsys):
    assert export_main(["--weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "m.onnx")]) == 1
    assert_one_sentence(capsys.readouterr().err, "checkpoint not found")


def test_the_shipped_layout_runs_its_convolutions_as_2d(exported):
    """The 1-D graph (``--conv1d``) is kept only for comparison; what ships is the 2-D form, whose
    equality with PyTorch the parity tests above prove."""
    kernels = {
        len(a.ints)
        for n in onnx.load(str(exported)).graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "kernel_shape"
    }
    assert kernels == {2}


def test_upsampling_as_conv_computes_the_same_function(exported, tmp_path):
    from export.conv2d import upsampling_as_conv

    rewritten = upsampling_as_conv(onnx.load(str(exported)))
    assert not [n for n in rewritten.graph.node if n.op_type == "ConvTranspose"]
    path = tmp_path / "rewritten.onnx"
    onnx.save(rewritten, str(path))
    windows = parity_windows(16, seed=2)
    assert np.abs(one_thread_engine(path).run(windows) - one_thread_engine(exported).run(windows)).max() <= 1e-5
