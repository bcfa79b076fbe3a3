"""The Attention U-Net matches the old architecture: parameter count, key names, shapes."""

from __future__ import annotations

import torch

from export.model import AttentionUNet, parameter_count
from service.contract import WINDOW


def test_parameter_count_matches_the_old_model():
    assert parameter_count(AttentionUNet()) == 2_796_541


def test_state_dict_keys_follow_the_old_checkpoint():
    keys = set(AttentionUNet().state_dict())
    for expected in (
        "enc1.conv.0.weight",
        "enc1.conv.1.running_mean",
        "enc4.conv.4.num_batches_tracked",
        "center.conv.3.weight",
        "dec1.conv.4.bias",
        "up4.weight",
        "up1.bias",
        "att4.W_g.0.weight",
        "att4.W_x.1.running_var",
        "att1.psi.1.bias",
        "att1.psi.0.weight",
        "final.weight",
        "final.bias",
    ):
        assert expected in keys
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {
        "enc1",
        "enc2",
        "enc3",
        "enc4",
        "center",
        "dec4",
        "dec3",
        "dec2",
        "dec1",
        "up4",
        "up3",
        "up2",
        "up1",
        "att4",
        "att3",
        "att2",
        "att1",
        "final",
    }


def test_output_has_the_input_length_for_any_length():
    model = AttentionUNet().eval()
    with torch.no_grad():
        for length in (WINDOW, 1000, 17):
            assert model(torch.randn(2, 1, length)).shape == (2, 1, length)
