"""A tiny CuMo on CPU: upcycle a CLIP vision model and a connector, train a few steps with the aux losses.

    python -m cumo.demo [--steps 5] [--backend auto]

Builds a tiny Hugging Face CLIP vision model and CuMo's dense connector (mlp2x_gelu), checks that
co-upcycling keeps their outputs, wraps the tower in S^2 (scales 1, 3), and trains tower and
connector on a synthetic regression target with CuMo's aux losses (0.1 * balance + 0.01 * z per
place). Needs transformers (`pip install 'cumo-kernels[hf]'`).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn

import cumo
import cumo_kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cumo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default=None, help="auto | torch | triton | cuda (default: $CUMO_KERNELS_BACKEND)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel
    except ImportError as exc:
        raise SystemExit(f"the demo needs transformers >= 5: pip install 'cumo-kernels[hf]' ({exc})") from exc

    start = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    tower = CLIPVisionModel(config).to(device)
    channels = 96
    connector = nn.Sequential(nn.Linear(2 * 64, channels), nn.GELU(), nn.Linear(channels, channels)).to(device)

    images = torch.randn(4, 3, 56, 56, device=device)
    with torch.no_grad():
        dense_feats, _, _ = cumo.MultiScaleVisionTower(copy.deepcopy(tower))(images)
        dense_out = connector(dense_feats)

    # Stage 3 of CuMo: co-upcycle both places (4 experts, top-2), every expert a copy of the dense MLP.
    cumo.convert_clip_to_moe(tower, num_experts=4, top_k=2, backend=args.backend)
    connector = cumo.upcycle_mlp(connector, num_experts=4, top_k=2, backend=args.backend)
    s2 = cumo.MultiScaleVisionTower(tower, scales=(1, 3))
    with torch.no_grad():
        feats, _, _ = s2(images)
        out, _, _ = connector(feats)
    # The model code knows no backend: the kernel library chooses one per layer call ("auto"
    # takes the first that can run it of those that run here).
    requested = args.backend or os.environ.get("CUMO_KERNELS_BACKEND") or "auto"
    runnable = ", ".join(cumo_kernels.available_backends(device))
    print(f"backend: {requested} (device {device.type}; backends that run here: {runnable})")
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    n = images.shape[0]
    print(f"encoder calls per step: {n} images x {tokens} tokens (whole), {9 * n} crops x {tokens} tokens (3x image)")
    print(f"connector input: {list(feats.shape)}; upcycled vs dense: max |diff| {(out - dense_out).abs().max():.2e}")

    target = torch.randn(out.shape, device=device)
    params = list(tower.parameters()) + list(connector.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    tower.train()
    for step in range(1, args.steps + 1):
        feats, v_balance, v_z = s2(images)
        out, c_balance, c_z = connector(feats)
        task = nn.functional.mse_loss(out, target)
        aux = cumo.aux_loss((v_balance, v_z), (c_balance, c_z))
        loss = task + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(
            f"step {step}: loss {loss.item():.4f} = task {task.item():.4f} + aux {aux.item():.4f} "
            f"(vision balance {v_balance.item():.4f} z {v_z.item():.4f}, "
            f"connector balance {c_balance.item():.4f} z {c_z.item():.4f})"
        )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
