"""cumo.checkpoint.to_cumo / from_cumo: CuMo's keys (CUMO.md, "Checkpoint formats"), both ways."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cumo
from cumo.checkpoint import from_cumo, to_cumo

pytest.importorskip("transformers")
from test_cumo_vision import perturb_experts, pixels, scramble_gates, tiny_clip  # noqa: E402

E = 4


def cumo_tower_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CuMo's MoE tower checkpoint for `model`'s weights, assembled by hand from CUMO.md's key list."""
    vm = "vision_model."
    sd = {vm + "embeddings." + n: t for n, t in model.embeddings.state_dict().items()}
    sd.update({vm + "pre_layrnorm." + n: t for n, t in model.pre_layrnorm.state_dict().items()})
    for i, layer in enumerate(model.encoder.layers):
        p = f"{vm}encoder.layers.{i}."
        for part in ("self_attn", "layer_norm1", "layer_norm2"):
            sd.update({p + part + "." + n: t for n, t in getattr(layer, part).state_dict().items()})
        moe = layer.mlp
        sd[p + "gate.weight"] = moe.gate.weight.detach()
        for e in range(moe.num_experts):
            sd[p + f"experts.{e}.fc1.weight"] = moe.w1[e].detach()
            sd[p + f"experts.{e}.fc1.bias"] = moe.b1[e].detach()
            sd[p + f"experts.{e}.fc2.weight"] = moe.w2[e].detach()
            sd[p + f"experts.{e}.fc2.bias"] = moe.b2[e].detach()
    return sd


def cumo_connector_dict(conn: cumo.MLPMoE, prefix: str = "") -> dict[str, torch.Tensor]:
    """CuMo's MoE connector keys for `conn`'s weights, by hand from CUMO.md's key list."""
    sd = {prefix + "gate.weight": conn.gate.weight.detach()}
    for e in range(conn.num_experts):
        sd[prefix + f"experts.{e}.0.weight"] = conn.w1[e].detach()
        sd[prefix + f"experts.{e}.0.bias"] = conn.b1[e].detach()
        sd[prefix + f"experts.{e}.2.weight"] = conn.w2[e].detach()
        sd[prefix + f"experts.{e}.2.bias"] = conn.b2[e].detach()
    return sd


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def trained_moe_clip(seed: int) -> nn.Module:
    model = cumo.convert_clip_to_moe(tiny_clip(seed))
    scramble_gates(model, seed + 100)
    perturb_experts(model, seed + 200)
    return model


def test_to_cumo_of_a_converted_tower_is_exactly_cumos_checkpoint():
    model = trained_moe_clip(1)
    expected = cumo_tower_dict(model)
    assert "vision_model.encoder.layers.1.experts.3.fc2.bias" in expected
    assert expected["vision_model.encoder.layers.0.gate.weight"].shape == (E, 24)
    assert_same(to_cumo(model.state_dict()), expected)
    # the parameter names (stacked, what optimisers and ZeRO consolidation see) convert to the same
    assert_same(to_cumo(dict(model.named_parameters())), {k: v for k, v in expected.items()})


def test_cumo_checkpoint_loads_strict_after_from_cumo():
    source = trained_moe_clip(2)
    ckpt = cumo_tower_dict(source)
    target = cumo.convert_clip_to_moe(tiny_clip(3))  # other weights, other gates
    sd = from_cumo(ckpt)
    # CuMo's towers have no post_layernorm: from_cumo adds one with the identity affine (weight 1, bias 0)
    assert torch.equal(sd["post_layernorm.weight"], torch.ones(24)) and not sd["post_layernorm.bias"].any()
    target.load_state_dict(sd, strict=True)
    x = pixels(seed=4)
    with torch.no_grad():
        a = source(x, output_hidden_states=True)
        b = target(x, output_hidden_states=True)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(hb, ha, rtol=0, atol=0)
    # a LayerNorm without affine still normalises: the pooler output is the normalised CLS state
    cls = b.last_hidden_state[:, 0]
    expect = (cls - cls.mean(-1, keepdim=True)) / torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(b.pooler_output, expect, rtol=1e-5, atol=1e-5)
    # without the fill, exactly post_layernorm.* is missing
    result = cumo.convert_clip_to_moe(tiny_clip(3)).load_state_dict(from_cumo(ckpt, post_layernorm=False), strict=False)
    assert sorted(result.missing_keys) == ["post_layernorm.bias", "post_layernorm.weight"]
    assert result.unexpected_keys == []


def test_round_trips_both_ways():
    model = trained_moe_clip(5)
    with torch.no_grad():
        model.post_layernorm.weight.add_(0.5)  # not an identity: only keep_post_layernorm keeps it
    sd = model.state_dict()  # the stacked parameter names
    assert_same(from_cumo(to_cumo(sd, keep_post_layernorm=True), stacked=True), sd)
    model.load_state_dict(from_cumo(to_cumo(sd, keep_post_layernorm=True)), strict=True)  # per-expert keys load too
    ckpt = cumo_tower_dict(model)
    assert_same(to_cumo(from_cumo(ckpt)), ckpt)
    assert_same(to_cumo(from_cumo(ckpt, stacked=True)), ckpt)


def test_stacked_from_cumo_gives_the_parameter_names():
    model = trained_moe_clip(6)
    sd = from_cumo(cumo_tower_dict(model), stacked=True)
    params = dict(model.named_parameters())
    assert set(params) <= set(sd) and "encoder.layers.0.mlp.w1" in sd
    for name, p in params.items():
        assert torch.equal(sd[name], p), name
    cumo.convert_clip_to_moe(tiny_clip(7)).load_state_dict(sd, strict=True)


def whole_model(seed: int) -> nn.Module:
    """A LLaVA/CuMo-shaped host: model.vision_tower.vision_tower, model.mm_projector, an LLM part."""
    torch.manual_seed(seed)
    host = nn.Module()
    host.model = nn.Module()
    host.model.vision_tower = nn.Module()
    host.model.vision_tower.vision_tower = trained_moe_clip(seed)
    host.model.mm_projector = cumo.MLPMoE(E, 2, 48, 40)
    host.model.layers = nn.ModuleList([nn.Linear(40, 40)])
    host.lm_head = nn.Linear(40, 11)
    return host


def test_whole_model_dict_converts_and_unknown_keys_pass_through():
    host = whole_model(8)
    ckpt = to_cumo(host.state_dict())
    tower = cumo_tower_dict(host.model.vision_tower.vision_tower)
    expected = {"model.vision_tower.vision_tower." + k: v for k, v in tower.items()}
    expected.update(cumo_connector_dict(host.model.mm_projector, "model.mm_projector."))
    expected.update(
        {"model.layers.0.weight": host.model.layers[0].weight, "model.layers.0.bias": host.model.layers[0].bias}
    )
    expected.update({"lm_head.weight": host.lm_head.weight, "lm_head.bias": host.lm_head.bias})
    assert_same(ckpt, expected)
    assert "model.mm_projector.experts.3.2.weight" in ckpt and "model.mm_projector.gate.weight" in ckpt
    other = whole_model(9)
    other.load_state_dict(from_cumo(ckpt), strict=True)
    other.load_state_dict(from_cumo(ckpt, stacked=True), strict=True)
    assert_same(to_cumo(other.state_dict()), ckpt)
    # stacked connector names (named_parameters, state_dict) unstack to CuMo's
    conn = to_cumo({"mm_projector." + n: p for n, p in host.model.mm_projector.named_parameters()})
    assert_same(conn, cumo_connector_dict(host.model.mm_projector, "mm_projector."))


def test_dense_checkpoints_pass_through():
    dense_tower = tiny_clip(10)
    c = to_cumo(dense_tower.state_dict())
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in c and not any("post_layernorm" in k for k in c)
    dense_connector = {"mm_projector.0.weight": torch.ones(4, 3), "mm_projector.2.bias": torch.ones(4)}
    assert_same(to_cumo(dense_connector), dense_connector)
    assert_same(from_cumo(dense_connector), dense_connector)
    reloaded = tiny_clip(11)
    reloaded.load_state_dict(from_cumo(c), strict=True)
    for n, p in dense_tower.named_parameters():
        if not n.startswith("post_layernorm."):  # dropped by to_cumo, filled with weight 1, bias 0
            assert torch.equal(reloaded.get_parameter(n), p), n


def test_host_keeping_vision_model_prefix():
    from transformers import CLIPVisionModelWithProjection

    source = cumo.convert_clip_to_moe(tiny_clip(12, cls=CLIPVisionModelWithProjection))
    sd = source.state_dict()
    assert "vision_model.encoder.layers.0.mlp.gate.weight" in sd
    target = cumo.convert_clip_to_moe(tiny_clip(13, cls=CLIPVisionModelWithProjection))
    target.load_state_dict(from_cumo(to_cumo(sd, keep_post_layernorm=True), strip_vision_model=False), strict=True)
    for (n, p), q in zip(source.named_parameters(), target.parameters()):  # strict names alone prove no values
        assert torch.equal(p, q), n


def test_incomplete_experts_are_an_error():
    ckpt = cumo_tower_dict(trained_moe_clip(14))
    del ckpt["vision_model.encoder.layers.0.experts.1.fc1.bias"]
    with pytest.raises(RuntimeError, match="incomplete"):
        cumo.convert_clip_to_moe(tiny_clip(15)).load_state_dict(from_cumo(ckpt))
    with pytest.raises(ValueError, match="incomplete"):
        from_cumo(ckpt, stacked=True)


def test_missing_experts_are_reported_under_the_state_dict_names():
    """A checkpoint in CuMo's keys that lacks a layer's MoE block: the missing keys are the module's
    state-dict names (its stacked parameters), as for any torch module."""
    ckpt = from_cumo(cumo_tower_dict(trained_moe_clip(16)))
    ckpt = {k: v for k, v in ckpt.items() if not k.startswith(("encoder.layers.0.experts.", "encoder.layers.0.gate."))}
    result = cumo.convert_clip_to_moe(tiny_clip(17)).load_state_dict(ckpt, strict=False)
    expected = [f"encoder.layers.0.mlp.{n}" for n in ("gate.weight", "w1", "b1", "w2", "b2")]
    assert sorted(result.missing_keys) == sorted(expected) and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r'"w1"'):
        cumo.MLPMoE(E, 2, 8, 6).load_state_dict({"gate.weight": torch.zeros(E, 8)})


def test_zero3_placeholders_save_and_load_under_their_stacked_names():
    """DeepSpeed ZeRO-3 replaces partitioned parameters' data by empty tensors, and its engine's
    save_checkpoint still calls module.state_dict(): the hooks must not index into them."""
    host = whole_model(18)
    for p in host.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
    sd = host.state_dict()
    tower = "model.vision_tower.vision_tower.encoder.layers.0."
    assert {tower + "mlp.w1", tower + "mlp.b2", tower + "mlp.gate.weight", "model.mm_projector.w1"} <= set(sd)
    assert not any(".experts." in k for k in sd)
    assert all(v.numel() == 0 for k, v in sd.items() if k.endswith(("w1", "b1", "w2", "b2")))
    host.load_state_dict(sd, strict=True)


def test_filled_post_layernorm_is_the_identity_affine_whatever_pre_layrnorm_holds():
    """from_cumo's post_layernorm is weight 1, bias 0 (its docstring), not a copy of pre_layrnorm:
    tiny CLIPs start with pre_layrnorm = (1, 0), so here it holds other values, in every layout
    and dtype from_cumo writes."""
    source = trained_moe_clip(30)
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        source.pre_layrnorm.weight.copy_(1.5 + 0.5 * torch.randn(24, generator=g))
        source.pre_layrnorm.bias.copy_(0.5 * torch.randn(24, generator=g))
    ckpt = cumo_tower_dict(source)
    host = "model.vision_tower.vision_tower."
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        typed = {k: v.to(dtype) for k, v in ckpt.items()}
        layouts = (
            ("plain", "", from_cumo(typed)),
            ("stacked", "", from_cumo(typed, stacked=True)),
            ("vision_model kept", "vision_model.", from_cumo(typed, strip_vision_model=False)),
            ("whole model", host, from_cumo({host + k: v for k, v in typed.items()})),
        )
        for label, p, sd in layouts:
            pre_w, pre_b = sd[p + "pre_layrnorm.weight"], sd[p + "pre_layrnorm.bias"]
            assert torch.equal(pre_w, typed["vision_model.pre_layrnorm.weight"]), label  # kept as it was
            w, b = sd[p + "post_layernorm.weight"], sd[p + "post_layernorm.bias"]
            for name, got, want in (
                ("weight", w, torch.ones(24, dtype=dtype)),
                ("bias", b, torch.zeros(24, dtype=dtype)),
            ):
                assert got.dtype == dtype and got.shape == (24,), (label, name, got.dtype, got.shape)
                assert torch.equal(got, want), f"{label} post_layernorm.{name} is not the identity's: {got[:4]}"
            assert w.data_ptr() != pre_w.data_ptr() and b.data_ptr() != pre_b.data_ptr(), label
    # loaded strictly, the tower keeps the source's pre_layrnorm and gets the identity post_layernorm
    target = cumo.convert_clip_to_moe(tiny_clip(32))
    target.load_state_dict(from_cumo(ckpt), strict=True)
    assert torch.equal(target.pre_layrnorm.weight, source.pre_layrnorm.weight)
    assert torch.equal(target.pre_layrnorm.bias, source.pre_layrnorm.bias)
    assert torch.equal(target.post_layernorm.weight, torch.ones(24))
    assert torch.equal(target.post_layernorm.bias, torch.zeros(24))
