"""cumo.convert_clip_to_moe / collect_aux_losses / from_pretrained on tiny Hugging Face CLIP models.

The reference runs the converted model's own attention, layer norms and embeddings in float64 and
its MoE blocks through tests/oracle.py's float64 implementation of CUMO.md's math.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from oracle import F64, moe_oracle

import cumo

transformers = pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPEncoderLayer  # noqa: E402

from cumo_kernels.testing import assert_close_rel  # noqa: E402

E, K = 4, 2


def tiny_config(**kw) -> CLIPVisionConfig:
    """2 layers, hidden 24, MLP 36, 3x3 patches + CLS = 10 tokens per image, quick_gelu (CLIP's)."""
    args = dict(
        hidden_size=24,
        intermediate_size=36,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=42,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=8,
    )
    args.update(kw)
    return CLIPVisionConfig(**args)


def tiny_clip(seed: int = 0, cls=CLIPVisionModel, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(tiny_config(**kw)).eval()


def pixels(batch: int = 3, seed: int = 1, size: int = 42) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def scramble_gates(model: torch.nn.Module, seed: int, scale: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.mlp.gate.weight.copy_(scale * torch.randn(layer.mlp.gate.weight.shape, generator=g))


def perturb_experts(model: torch.nn.Module, seed: int) -> None:
    """Move the experts apart (as training would), so that routing changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.encoder.layers:
            for p in (layer.mlp.w1, layer.mlp.b1, layer.mlp.w2, layer.mlp.b2):
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))


def oracle_forward(model64: torch.nn.Module, pixel_values: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(last_hidden_state, hidden_states, balance mean, z mean) in float64; gradients reach model64's parameters."""
    h = model64.pre_layrnorm(model64.embeddings(pixel_values.to(F64)))
    hidden, balances, zs = [h], [], []
    for layer in model64.encoder.layers:
        h = h + layer.self_attn(hidden_states=layer.layer_norm1(h), attention_mask=None)[0]
        moe = layer.mlp
        y, b, z, _ = moe_oracle(
            layer.layer_norm2(h),
            moe.gate.weight,
            moe.w1,
            moe.b1,
            moe.w2,
            moe.b2,
            moe.top_k,
            moe.activation,
            dtype=dtype,
        )
        h = h + y
        hidden.append(h)
        balances.append(b)
        zs.append(z)
    return h, hidden, torch.stack(balances).mean(), torch.stack(zs).mean()


def test_converted_model_keeps_the_hf_forward_to_float32_rounding():
    """Upcycling identity at the model level: whatever the gate, the converted model is the dense one."""
    dense = tiny_clip(attn_implementation="eager")  # sdpa returns no attentions: nothing to compare
    moe = cumo.convert_clip_to_moe(copy.deepcopy(dense))
    scramble_gates(moe, 3)
    x = pixels()
    with torch.no_grad():
        a = dense(x, output_hidden_states=True, output_attentions=True)
        b = moe(x, output_hidden_states=True, output_attentions=True)
    assert len(b.attentions) == len(a.attentions) == 2
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=1e-5, atol=1e-5)
    assert len(b.hidden_states) == len(a.hidden_states) == 3
    for hb, ha in zip(b.hidden_states, a.hidden_states):
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)
    for ab, aa in zip(b.attentions, a.attentions):
        torch.testing.assert_close(ab, aa, rtol=1e-5, atol=1e-5)


def test_conversion_tree_and_parameters():
    dense = tiny_clip()
    mlp0 = copy.deepcopy(dense.encoder.layers[0].mlp)
    attn0 = dense.encoder.layers[0].self_attn
    model = cumo.convert_clip_to_moe(dense, num_experts=3, top_k=1)
    assert model is dense
    layer = model.encoder.layers[0]
    assert isinstance(layer, CLIPEncoderLayer) and layer.self_attn is attn0
    assert isinstance(layer.mlp, cumo.CLIPMoEMLP) and layer.mlp.activation == "quick_gelu"
    assert (layer.mlp.num_experts, layer.mlp.top_k) == (3, 1)
    assert layer.mlp.w1.shape == (3, 36, 24) and layer.mlp.w2.shape == (3, 24, 36)
    for e in range(3):
        assert torch.equal(layer.mlp.w1[e], mlp0.fc1.weight) and torch.equal(layer.mlp.b2[e], mlp0.fc2.bias)
    assert model.config.cumo_moe == {"num_experts": 3, "top_k": 1}
    with pytest.raises(ValueError, match="already converted"):
        cumo.convert_clip_to_moe(model)
    with pytest.raises(TypeError, match="CLIP vision model"):
        cumo.convert_clip_to_moe(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("hidden_act, expected", [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_activation_follows_the_config(hidden_act, expected):
    model = cumo.convert_clip_to_moe(tiny_clip(hidden_act=hidden_act))
    assert model.encoder.layers[1].mlp.activation == expected


def test_other_entry_points_with_projection_and_bare_encoder():
    for model, encoder in (
        (m := tiny_clip(cls=CLIPVisionModelWithProjection), m.vision_model.encoder),
        (m2 := tiny_clip().encoder, m2),
    ):
        cumo.convert_clip_to_moe(model)
        assert all(isinstance(layer.mlp, cumo.CLIPMoEMLP) for layer in encoder.layers)
    out = m(pixels())
    assert out.image_embeds.shape == (3, 8)
    assert cumo.collect_aux_losses(m)[0].dtype == torch.float32


@pytest.mark.parametrize("target", ["y", "balance", "z"])
def test_forward_losses_and_every_gradient_match_float64_oracle(target):
    model = cumo.convert_clip_to_moe(tiny_clip(2))
    scramble_gates(model, 4)
    perturb_experts(model, 5)
    model64 = copy.deepcopy(model).double()
    x = pixels(seed=6)
    out = model(x, output_hidden_states=True)
    balance, z = cumo.collect_aux_losses(model)
    assert balance.dtype == torch.float32 and z.dtype == torch.float32
    h64, hidden64, b64, z64 = oracle_forward(model64, x)
    for i, (hs, ref) in enumerate(zip(out.hidden_states, hidden64)):
        assert_close_rel(hs, ref, torch.float32, f"hidden_states[{i}]")
    assert_close_rel(balance, b64, torch.float32, "balance (mean over layers)")
    assert_close_rel(z, z64, torch.float32, "z (mean over layers)")

    r = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(7))
    pick = {"y": lambda h, b, zz: (h * r.to(h.dtype)).sum(), "balance": lambda h, b, zz: b, "z": lambda h, b, zz: zz}
    pick[target](out.last_hidden_state, balance, z).backward()
    pick[target](h64, b64, z64).backward()
    ref = dict(model64.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if ref[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        if ref[name].grad.norm() < 1e-12:  # zero in exact arithmetic (k_proj.bias: softmax is shift-invariant)
            assert p.grad.abs().max() < 1e-5, name
            continue
        assert_close_rel(p.grad, ref[name].grad, torch.float32, f"grad {name} ({target})")
        checked += 1
    assert checked >= (20 if target == "y" else 10)


def test_aux_losses_are_per_layer_means_and_every_layer_counts():
    model = cumo.convert_clip_to_moe(tiny_clip(3))
    scramble_gates(model, 8)
    model(pixels())
    per_layer = [layer.aux_losses for layer in model.encoder.layers]
    balance, z = cumo.collect_aux_losses(model)
    assert torch.equal(balance, torch.stack([b for b, _ in per_layer]).mean())
    assert torch.equal(z, torch.stack([zz for _, zz in per_layer]).mean())
    # the last layer's losses count although its output is not CuMo's feature
    assert per_layer[-1][0].item() != per_layer[0][0].item()


def test_collect_before_any_forward_and_on_dense_models():
    with pytest.raises(RuntimeError, match="not run"):
        cumo.collect_aux_losses(cumo.convert_clip_to_moe(tiny_clip()))
    with pytest.raises(ValueError, match="no CLIP-MoE layers"):
        cumo.collect_aux_losses(tiny_clip())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_losses_and_gradients(reentrant):
    model = cumo.convert_clip_to_moe(tiny_clip(4)).train()
    scramble_gates(model, 9)
    perturb_experts(model, 10)
    ckpt = copy.deepcopy(model)
    with warnings.catch_warnings():
        # the helper takes the current API name: no deprecation warning on any transformers 5.x
        warnings.simplefilter("error", FutureWarning)
        assert cumo.enable_activation_checkpointing(ckpt, use_reentrant=reentrant) is ckpt
    assert all(layer.gradient_checkpointing for layer in ckpt.encoder.layers)
    x = pixels(seed=11)
    results, calls = [], []
    for m in (model, ckpt):
        count = [0]
        m.encoder.layers[0].mlp.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        calls.append(count)
        out = m(x)
        balance, z = cumo.collect_aux_losses(m)
        assert balance.requires_grad and z.requires_grad
        loss = out.last_hidden_state.square().mean() + 0.3 * balance + 0.2 * z
        before = [layer.aux_losses for layer in m.encoder.layers]
        loss.backward()
        # the recomputation in the backward overwrote nothing
        assert all(layer.aux_losses is a for layer, a in zip(m.encoder.layers, before))
        results.append((balance.detach(), z.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert [c[0] for c in calls] == [1, 2]  # checkpointing did recompute the layer in the backward
    (b0, z0, g0), (b1, z1, g1) = results
    torch.testing.assert_close(b1, b0)
    torch.testing.assert_close(z1, z0)
    for name, grad in g0.items():
        torch.testing.assert_close(g1[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert g1["encoder.layers.0.mlp.gate.weight"].abs().sum() > 0


# transformers 5.17 has gradient_checkpointing_enable only; later 5.x add activation_checkpointing_enable
# and keep the old name as a deprecated alias. Each entry point this version has must work.
CHECKPOINTING_APIS = (
    ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
    ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method, kwarg", CHECKPOINTING_APIS, ids=[m for m, _ in CHECKPOINTING_APIS])
def test_transformers_checkpointing_entry_points_on_a_converted_model(method, kwarg):
    if not hasattr(CLIPVisionModel, method):
        pytest.skip(f"transformers {transformers.__version__} has no {method}")
    model = cumo.convert_clip_to_moe(tiny_clip(4)).train()
    getattr(model, method)(**{kwarg: {"use_reentrant": True}})
    for layer in model.encoder.layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": True}
    calls = [0]
    model.encoder.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = model(pixels(seed=11))
    balance, z = cumo.collect_aux_losses(model)
    (out.last_hidden_state.square().mean() + balance + z).backward()
    assert calls[0] == 2  # recomputed in the backward
    assert model.encoder.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_enable_activation_checkpointing_needs_a_transformers_model():
    assert any(hasattr(CLIPVisionModel, m) for m, _ in CHECKPOINTING_APIS)
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        cumo.enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_save_pretrained_then_cumo_from_pretrained_keeps_the_moe(tmp_path):
    model = cumo.convert_clip_to_moe(tiny_clip(5), num_experts=3, top_k=2)
    scramble_gates(model, 12)
    perturb_experts(model, 13)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert "encoder.layers.1.experts.2.fc2.bias" in saved and not any(".mlp." in k for k in saved)
    loaded = cumo.from_pretrained(tmp_path)
    assert type(loaded) is cumo.CLIPMoEVisionModel and isinstance(loaded, CLIPVisionModel)
    assert loaded.config.cumo_moe == {"num_experts": 3, "top_k": 2}
    x = pixels(seed=14)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n


def test_import_cumo_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import cumo, torch\n"
        "m = cumo.MLPMoE(4, 2, 8, 6); y, b, z = m(torch.randn(2, 3, 8))\n"
        "try:\n    cumo.convert_clip_to_moe(torch.nn.Module())\nexcept ImportError as e:\n    print('hint:', e)\n"
        "try:\n    cumo.CLIPMoEVisionModel\nexcept ImportError as e:\n    print('class hint:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'cumo-kernels[hf]'" in out.stdout
    assert "class hint: the CLIP-MoE encoder needs transformers" in out.stdout


@pytest.mark.parametrize("gate", ["fresh", "random", "zero"])
def test_upcycled_clip_mlp_equals_its_dense_source(gate):
    dense = tiny_clip(6).encoder.layers[0].mlp
    moe = cumo.upcycle_mlp(dense, num_experts=E, top_k=K)
    assert isinstance(moe, cumo.CLIPMoEMLP) and moe.activation == "quick_gelu"
    with torch.no_grad():
        if gate == "random":
            moe.gate.weight.normal_(0, 3.0)
        elif gate == "zero":
            moe.gate.weight.zero_()
    x = torch.randn(3, 10, 24, generator=torch.Generator().manual_seed(15))
    y, balance, z = moe(x)
    with torch.no_grad():
        torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    assert balance.dtype == torch.float32 and z.dtype == torch.float32
    assert sorted(moe.state_dict()) == ["b1", "b2", "gate.weight", "w1", "w2"]  # the parameters' names
    # inside a layer (`L.mlp.`), CuMo's keys sit on the layer with CLIP's fc1/fc2 names
    in_layer = cumo.checkpoint.to_cumo({"encoder.layers.0.mlp." + k: v for k, v in moe.state_dict().items()})
    assert sorted(in_layer)[:3] == [
        "encoder.layers.0.experts.0.fc1.bias",
        "encoder.layers.0.experts.0.fc1.weight",
        "encoder.layers.0.experts.0.fc2.bias",
    ]


def test_from_pretrained_of_a_cumo_tower_with_a_plain_config(tmp_path):
    """A CuMo tower checkpoint (CuMo's keys, no post_layernorm) next to a plain CLIP config."""
    from safetensors.torch import save_file

    from cumo.checkpoint import to_cumo

    model = cumo.convert_clip_to_moe(tiny_clip(7))
    scramble_gates(model, 16)
    tiny_clip(8).save_pretrained(tmp_path)  # config without cumo_moe (and a dense file, replaced below)
    save_file({k: v.contiguous() for k, v in to_cumo(model.state_dict()).items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="num_experts"):
        cumo.from_pretrained(tmp_path)
    loaded = cumo.from_pretrained(tmp_path, num_experts=E, top_k=K)
    x = pixels(seed=17)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


def test_bfloat16_model_and_pickling(tmp_path):
    model = cumo.convert_clip_to_moe(tiny_clip(9)).to(torch.bfloat16)
    model(pixels().to(torch.bfloat16))
    balance, z = cumo.collect_aux_losses(model)
    assert balance.dtype == torch.float32 and z.dtype == torch.bfloat16  # CUMO.md's loss dtypes
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded.encoder.layers[0]).__name__ == "CLIPMoEEncoderLayer"
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())


def test_copies_and_pickles_after_a_training_forward(tmp_path):
    """The last call's losses (non-leaf tensors) are not module state: deepcopy (an EMA copy) and
    torch.save of a model that has just run a forward with grad work, and carry no stale losses."""
    model = cumo.convert_clip_to_moe(tiny_clip(10)).train()
    x = pixels()
    out = model(x)
    assert cumo.collect_aux_losses(model)[0].grad_fn is not None
    ema = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (ema, loaded):
        assert all(layer.aux_losses is None for layer in other.encoder.layers)
        with torch.no_grad():
            torch.testing.assert_close(other(x).last_hidden_state, out.last_hidden_state, rtol=0, atol=0)
        other_losses = cumo.collect_aux_losses(other)
        torch.testing.assert_close(other_losses[0], cumo.collect_aux_losses(model)[0].detach())
    assert model.encoder.layers[0].aux_losses is not None  # the original keeps its losses
