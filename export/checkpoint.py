"""Loading `.pth` checkpoints into the Attention U-Net, with one clear sentence for each failure."""

from __future__ import annotations

from pathlib import Path

import torch

from export.model import AttentionUNet

_NESTED_KEYS = ("state_dict", "model_state_dict")


class CheckpointError(Exception):
    """An expected, user-facing failure: missing, unreadable or mismatched checkpoint."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: bare, or nested under ``state_dict``/``model_state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (bare, or under {' / '.join(_NESTED_KEYS)})")
    return obj


def load_model(path: str | Path) -> AttentionUNet:
    """A model in eval mode with the checkpoint's weights, loaded strictly."""
    state = read_state_dict(path)
    model = AttentionUNet()
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the Attention U-Net: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path} does not match the Attention U-Net: {name} has shape "
                f"{tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()
