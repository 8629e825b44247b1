"""cumo.MultiScaleVisionTower (CuMo's S^2, scales 1 and 3), against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cumo
from cumo.s2 import merge_chessboard, split_chessboard

pytest.importorskip("transformers")
from test_cumo_vision import perturb_experts, pixels, scramble_gates, tiny_clip  # noqa: E402


def patch_features(model, x):
    return model(x, output_hidden_states=True).hidden_states[-2][:, 1:]  # CuMo: entering the last layer, no CLS


def direct_s2(model, x):
    """Whole image, and the 3x upsampled image as 3x3 crops put back in place and averaged 3x3."""
    b, side = x.shape[0], x.shape[-1]
    whole = patch_features(model, x)  # [B, 9, C]
    up = F.interpolate(x, size=(3 * side, 3 * side), mode="bicubic", align_corners=False)
    g = int(whole.shape[1] ** 0.5)
    c = whole.shape[2]
    big = torch.zeros(b, c, 3 * g, 3 * g)
    for i in range(3):
        for j in range(3):
            f = patch_features(model, up[..., i * side : (i + 1) * side, j * side : (j + 1) * side])
            big[..., i * g : (i + 1) * g, j * g : (j + 1) * g] = f.transpose(1, 2).reshape(b, c, g, g)
    crops = F.avg_pool2d(big, 3).flatten(2).transpose(1, 2)
    return torch.cat([whole, crops], dim=-1)


def test_chessboard_split_and_merge_are_inverse():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    tiles = split_chessboard(x, 3)
    assert tiles.shape == (18, 3, 2, 2)
    assert torch.equal(tiles[2 * (1 * 3 + 2) + 1], x[1, :, 2:4, 4:6])  # crop (1, 2) of image 1
    assert torch.equal(merge_chessboard(tiles, 3), x)


def test_dense_tower_features_match_direct_computation():
    model = tiny_clip(1)
    tower = cumo.MultiScaleVisionTower(model)
    x = pixels(batch=2, seed=2)
    with torch.no_grad():
        feats, balance, z = tower(x)
        ref = direct_s2(model, x)
    assert feats.shape == (2, 9, 48)  # first scale's tokens, 2 x the encoder's channels
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert balance.item() == 0 and balance.dtype == torch.float32 and z.item() == 0


def test_moe_tower_losses_are_averaged_per_scale_and_differentiable():
    model = cumo.convert_clip_to_moe(tiny_clip(3))
    scramble_gates(model, 4)
    perturb_experts(model, 5)
    tower = cumo.MultiScaleVisionTower(model)
    x = pixels(batch=2, seed=6)
    feats, balance, z = tower(x)
    with torch.no_grad():
        torch.testing.assert_close(feats, direct_s2(model, x), rtol=1e-5, atol=1e-5)
        model(x)
        whole = cumo.collect_aux_losses(model)
        up = F.interpolate(x, size=(126, 126), mode="bicubic", align_corners=False)
        model(torch.cat([up[..., i * 42 : (i + 1) * 42, j * 42 : (j + 1) * 42] for i in range(3) for j in range(3)]))
        crops = cumo.collect_aux_losses(model)
    torch.testing.assert_close(balance.detach(), (whole[0] + crops[0]) / 2)
    torch.testing.assert_close(z.detach(), (whole[1] + crops[1]) / 2)
    cumo.aux_loss((balance, z)).backward()
    assert model.encoder.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="whole image first"):
        cumo.MultiScaleVisionTower(tiny_clip(), scales=(3, 1))
    with pytest.raises(ValueError, match="square"):
        cumo.MultiScaleVisionTower(tiny_clip())(torch.randn(1, 3, 42, 28))


def test_demo_runs(capsys, monkeypatch):
    from cumo.demo import main

    monkeypatch.delenv("CUMO_KERNELS_BACKEND", raising=False)
    main(["--steps", "1"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("backend: "))
    assert line.startswith("backend: auto (device cpu; backends that run here: ") and "torch" in line
    assert "step 1: loss" in out
    diff = float(out.split("max |diff| ")[1].split()[0])
    assert diff < 1e-5  # upcycling kept the dense outputs
