"""The 1-D Attention U-Net of the original Heartify service.

Layer names and order match the old checkpoint `best_attention_unet.pth`, so a state dict saved
by the old training code loads here with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DEPTH_MULTIPLE = 16  # four MaxPool1d(2) stages


class ConvBlock(nn.Module):
    """Two (Conv1d k=3 → BatchNorm1d → LeakyReLU(0.1)) layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv1d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AttentionGate(nn.Module):
    """Additive attention: weights the skip connection ``x`` by a gate computed with ``g``."""

    def __init__(self, f_g: int, f_l: int, f_int: int) -> None:
        super().__init__()
        self.W_g = nn.Sequential(nn.Conv1d(f_g, f_int, kernel_size=1, bias=True), nn.BatchNorm1d(f_int))
        self.W_x = nn.Sequential(nn.Conv1d(f_l, f_int, kernel_size=1, bias=True), nn.BatchNorm1d(f_int))
        self.psi = nn.Sequential(nn.Conv1d(f_int, 1, kernel_size=1, bias=True), nn.BatchNorm1d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.relu(self.W_g(g) + self.W_x(x)))


class AttentionUNet(nn.Module):
    """Input and output ``[N, 1, L]``; any L works, it is padded to a multiple of 16 and cropped back."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = ConvBlock(1, 32)
        self.pool1 = nn.MaxPool1d(2)
        self.enc2 = ConvBlock(32, 64)
        self.pool2 = nn.MaxPool1d(2)
        self.enc3 = ConvBlock(64, 128)
        self.pool3 = nn.MaxPool1d(2)
        self.enc4 = ConvBlock(128, 256)
        self.pool4 = nn.MaxPool1d(2)
        self.center = ConvBlock(256, 512)

        self.up4 = nn.ConvTranspose1d(512, 256, kernel_size=2, stride=2)
        self.att4 = AttentionGate(256, 256, 128)
        self.dec4 = ConvBlock(512, 256)
        self.up3 = nn.ConvTranspose1d(256, 128, kernel_size=2, stride=2)
        self.att3 = AttentionGate(128, 128, 64)
        self.dec3 = ConvBlock(256, 128)
        self.up2 = nn.ConvTranspose1d(128, 64, kernel_size=2, stride=2)
        self.att2 = AttentionGate(64, 64, 32)
        self.dec2 = ConvBlock(128, 64)
        self.up1 = nn.ConvTranspose1d(64, 32, kernel_size=2, stride=2)
        self.att1 = AttentionGate(32, 32, 16)
        self.dec1 = ConvBlock(64, 32)

        self.final = nn.Conv1d(32, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        pad = (-length) % _DEPTH_MULTIPLE
        if pad:
            x = F.pad(x, (0, pad))
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        e3 = self.enc3(self.pool2(e2))
        e4 = self.enc4(self.pool3(e3))
        c = self.center(self.pool4(e4))
        d4 = self._decode(c, e4, self.up4, self.att4, self.dec4)
        d3 = self._decode(d4, e3, self.up3, self.att3, self.dec3)
        d2 = self._decode(d3, e2, self.up2, self.att2, self.dec2)
        d1 = self._decode(d2, e1, self.up1, self.att1, self.dec1)
        return self.final(d1)[..., :length]

    @staticmethod
    def _decode(
        below: torch.Tensor, skip: torch.Tensor, up: nn.Module, att: nn.Module, block: nn.Module
    ) -> torch.Tensor:
        g = up(below)
        return block(torch.cat([att(g, skip), g], dim=1))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
