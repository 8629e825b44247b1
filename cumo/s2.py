"""CuMo's multi-scale vision tower (S^2, "scales 1,3"), as an optional wrapper.

For scales (1, 3) and an image of side s: the image is encoded whole, and the image upsampled to
3s (bicubic) is cut into 3x3 crops of side s, each encoded as one sample; every crop's patch
features are put back in place (a 3x3 chessboard of feature maps), the large map is averaged back to
the first scale's grid (area interpolation, an exact 3x3 mean), and the scales are concatenated on
the channel axis. One image is 1 + 9 = 10 encoder samples; the connector sees the first scale's
token count with len(scales) x the encoder's channels (CUMO.md: 576 tokens, 2 x 1024 = 2048).

The encoder runs once per scale (as CuMo runs it), and the MoE losses are averaged per scale:
CuMo's balance statistics are per sample and each scale's losses count equally, which one call on
both scales (10 samples per image, the losses weighted 1:9) would not give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vision import collect_aux_losses, moe_layers


def split_chessboard(x: Tensor, n: int) -> Tensor:
    """[B, C, H, W] -> [n*n*B, C, H/n, W/n]: crop (i, j) of every image, crops in row-major order."""
    _, _, h, w = x.shape
    if h % n or w % n:
        raise ValueError(f"split_chessboard: {h}x{w} does not split into {n}x{n} crops")
    hs, ws = h // n, w // n
    return torch.cat([x[..., i * hs : (i + 1) * hs, j * ws : (j + 1) * ws] for i in range(n) for j in range(n)])


def merge_chessboard(x: Tensor, n: int) -> Tensor:
    """The inverse of `split_chessboard`: [n*n*B, C, h, w] -> [B, C, n*h, n*w]."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b : (i * n + j + 1) * b] for j in range(n)], dim=-1) for i in range(n)]
    return torch.cat(rows, dim=-2)


class MultiScaleVisionTower(nn.Module):
    """S^2 wrapper around a (converted or dense) Hugging Face CLIP vision model.

    Args:
        vision_model: CLIPVisionModel (or anything whose forward takes pixel values and accepts
            `output_hidden_states=True`).
        scales: image scales (CuMo: (1, 3)); scale s gives ceil(s) x ceil(s) crops of the input's side.
        select_layer: which hidden state is the feature (CuMo: -2, the state entering the last layer).

    forward(pixel_values [B, 3, S, S]) -> (features [B, P, C * len(scales)] with P the patch count
    (CLS dropped, as CuMo's "patch" features), balance, z): the MoE losses averaged over the layers
    and over the scales (zeros for a dense model: float32, and the features' dtype).
    """

    def __init__(self, vision_model: nn.Module, *, scales: tuple[float, ...] = (1, 3), select_layer: int = -2) -> None:
        super().__init__()
        if not scales or scales[0] != 1:
            raise ValueError(f"scales: expected the whole image first (1, ...), got {scales!r}")
        self.vision_model, self.scales, self.select_layer = vision_model, tuple(scales), select_layer

    def _features(self, pixel_values: Tensor) -> Tensor:
        out = self.vision_model(pixel_values, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, _, side, side_w = pixel_values.shape
        if side != side_w:
            raise ValueError(f"pixel_values: expected square images, got {side}x{side_w}")
        has_moe = bool(moe_layers(self.vision_model))
        maps, losses = [], []
        for s in self.scales:
            size, n = int(side * s), math.ceil(s)
            x = pixel_values
            if size != side:
                x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).to(x.dtype)
            feats = self._features(split_chessboard(x, n) if n > 1 else x)  # [n*n*B, P, C]
            if has_moe:
                losses.append(collect_aux_losses(self.vision_model))
            g = math.isqrt(feats.shape[1])
            if g * g != feats.shape[1]:
                raise ValueError(f"S^2 needs a square patch grid, got {feats.shape[1]} patches")
            fmap = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], g, g)
            maps.append(merge_chessboard(fmap, n) if n > 1 else fmap)
        g0 = maps[0].shape[-1]
        maps = [
            m if m.shape[-1] == g0 else F.interpolate(m.float(), size=(g0, g0), mode="area").to(m.dtype) for m in maps
        ]
        features = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
        if losses:
            balance = torch.stack([bal for bal, _ in losses]).mean()
            z = torch.stack([z for _, z in losses]).mean()
        else:
            balance = features.new_zeros((), dtype=torch.float32)
            z = features.new_zeros(())
        return features, balance, z
