"""transformers' own loading routes for a CLIP-MoE tower (`cumo.convert_clip_to_moe`, `cumo.CLIPMoEVisionModel`).

As a transformers user takes them: `save_pretrained`, then `from_pretrained` with each argument that
transformers documents and a CLIP user passes (ModelTesterMixin's loading cases, rewritten for the
converted model: transformers' test files are not in its wheel), `AutoModel`, the dense loaders'
refusal, accelerate's device_map and its own module walk (skipped without accelerate). Each route
compares every tensor (bit for bit, and its dtype) and the forward with the saved model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cumo
from cumo.checkpoint import to_cumo

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_cumo_vision import perturb_experts, pixels, scramble_gates, tiny_clip, tiny_config  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

CLIPMoE = cumo.CLIPMoEVisionModel
MOE_PARAMS = ("gate.weight", "w1", "b1", "w2", "b2")


def trained(seed: int, cls=CLIPVisionModel, num_experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A converted tiny CLIP whose gates and experts moved apart, as after training."""
    model = cumo.convert_clip_to_moe(tiny_clip(seed, cls=cls), num_experts=num_experts, top_k=top_k)
    tower = model.vision_model if cls is CLIPVisionModelWithProjection else model
    scramble_gates(tower, seed + 100)
    perturb_experts(tower, seed + 200)
    return model


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Same state-dict keys, every tensor equal bit for bit with the same dtype, the same forward."""
    g, w = got.state_dict(), want.state_dict()
    assert sorted(g) == sorted(w), (sorted(set(g) - set(w))[:4], sorted(set(w) - set(g))[:4])
    for k in w:
        assert g[k].dtype == w[k].dtype, (k, g[k].dtype, w[k].dtype)
        assert g[k].shape == w[k].shape and torch.equal(g[k], w[k]), k
    assert all(p.requires_grad for p in got.parameters())
    x = pixels(seed=50).to(dtype or next(want.parameters()).dtype)
    with torch.no_grad():
        if isinstance(want, (CLIPVisionModel, CLIPVisionModelWithProjection)):
            a, b = got(x, output_hidden_states=True).hidden_states, want(x, output_hidden_states=True).hidden_states
        else:
            a, b = [got(x)], [want(x)]
    for ha, hb in zip(a, b, strict=True):
        assert torch.equal(ha, hb)


def saved_keys(path) -> set[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return set(load_file(os.path.join(path, "model.safetensors")))


def tiny_fields() -> dict:
    """tiny_config()'s fields, to build other config classes from."""
    return {k: v for k, v in tiny_config().to_dict().items() if k not in ("model_type", "transformers_version")}


def moe_keys(layer: int, prefix: str = "") -> list[str]:
    return [f"{prefix}encoder.layers.{layer}.mlp.{n}" for n in MOE_PARAMS]


# --- test_save_load and friends ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CLIPVisionModel, CLIPVisionModelWithProjection])
def test_save_load_through_the_models_own_from_pretrained(tmp_path, cls):
    model = trained(1, cls=cls)
    moe_cls = {CLIPVisionModel: CLIPMoE, CLIPVisionModelWithProjection: cumo.CLIPMoEVisionModelWithProjection}[cls]
    assert type(model) is moe_cls and isinstance(model, cls)  # converted in place, still the dense class's API
    model.save_pretrained(tmp_path)
    p = "vision_model." if cls is CLIPVisionModelWithProjection else ""
    keys = saved_keys(tmp_path)  # CuMo's per-expert keys on disk
    assert f"{p}encoder.layers.1.experts.3.fc2.bias" in keys and f"{p}encoder.layers.0.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cumo_clip_vision_model" and config["architectures"] == [moe_cls.__name__]
    assert config["cumo_moe"] == {"num_experts": 4, "top_k": 2}
    routes = {
        "own class": lambda: type(model).from_pretrained(tmp_path),
        "cumo": lambda: cumo.from_pretrained(tmp_path),
    }
    if cls is CLIPVisionModel:
        routes["AutoModel"] = lambda: AutoModel.from_pretrained(tmp_path)
    for route, load in routes.items():
        loaded = load()
        assert type(loaded) is moe_cls, route
        assert not loaded.training and loaded.config.cumo_moe == {"num_experts": 4, "top_k": 2}, route
        assert_same_model(loaded, model)
    # saving what was loaded writes the same file
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    a, b = load_file(tmp_path / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_config_and_fresh_construction():
    config = AutoConfig.for_model("cumo_clip_vision_model", **tiny_fields())
    assert type(config) is cumo.CLIPMoEVisionConfig and config.cumo_moe == {"num_experts": 4, "top_k": 2}
    torch.manual_seed(3)
    model = AutoModel.from_config(config)
    assert type(model) is CLIPMoE and all(isinstance(layer.mlp, cumo.CLIPMoEMLP) for layer in model.encoder.layers)
    moe = model.encoder.layers[0].mlp
    # a fresh model is a freshly initialised CLIP, upcycled: every expert the same, CLIP's MLP std
    assert all(torch.equal(moe.w1[0], moe.w1[e]) for e in range(4)) and not moe.b1.any()
    assert abs(moe.w1.std().item() - (2 * 24) ** -0.5) < 0.05
    with pytest.raises(ValueError, match="top_k"):
        cumo.CLIPMoEVisionConfig(cumo_moe={"num_experts": 2, "top_k": 3})


def test_can_use_safetensors_and_sharded_checkpoints(tmp_path):
    model = trained(2)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    assert_same_model(CLIPMoE.from_pretrained(tmp_path / "sharded", use_safetensors=True), model)
    # save_pretrained keeps a stack's experts in one file (their views share storage); other writers
    # split them: here experts 0-1 of every layer in one file, 2-3 in another
    model.save_pretrained(tmp_path / "one")
    sd = load_file(tmp_path / "one" / "model.safetensors")
    split = tmp_path / "split"
    model.config.save_pretrained(split)
    names = {
        k: "a.safetensors" if ".experts." not in k or int(k.split(".experts.")[1][0]) < 2 else "b.safetensors"
        for k in sd
    }
    for f in ("a.safetensors", "b.safetensors"):
        save_file({k: v for k, v in sd.items() if names[k] == f}, split / f)
    (split / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    assert_same_model(CLIPMoE.from_pretrained(split), model)


def test_load_save_without_tied_weights(tmp_path):
    model = trained(3)
    model.save_pretrained(tmp_path)
    loaded = CLIPMoE.from_pretrained(tmp_path)
    assert_same_model(loaded, model)
    assert not loaded.all_tied_weights_keys
    ptrs = [p.untyped_storage().data_ptr() for p in loaded.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # the stacked experts are one tensor each, shared with nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept_as_saved(tmp_path, dtype):
    model = trained(4).to(dtype)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    for route, load in {
        "default": lambda: CLIPMoE.from_pretrained(tmp_path),
        "auto": lambda: CLIPMoE.from_pretrained(tmp_path, dtype="auto"),
        "AutoModel": lambda: AutoModel.from_pretrained(tmp_path),
        "cumo": lambda: cumo.from_pretrained(tmp_path),
    }.items():
        loaded = load()
        assert {p.dtype for p in loaded.parameters()} == {dtype}, route
        assert_same_model(loaded, model, dtype)
    upcast = CLIPMoE.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    for k, v in model.state_dict().items():
        assert torch.equal(upcast.state_dict()[k], v.float()), k
    assert cumo.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "auto", "float16"])
def test_bc_torch_dtype(tmp_path, dtype):
    model = trained(5)
    model.save_pretrained(tmp_path)
    old = CLIPMoE.from_pretrained(tmp_path, torch_dtype=dtype)
    new = CLIPMoE.from_pretrained(tmp_path, dtype=dtype)
    want = {"auto": torch.float32, "float16": torch.float16}.get(dtype, dtype)
    assert old.dtype == new.dtype == want
    assert_same_model(old, new)


def test_output_loading_info_and_correct_missing_keys(tmp_path):
    model = trained(6)
    model.save_pretrained(tmp_path)
    loaded, info = CLIPMoE.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_model(loaded, model)
    # a file without layer 0's MoE block: missing under the state-dict names, initialised as upcycling does
    partial = tmp_path / "partial"
    model.config.save_pretrained(partial)
    sd = load_file(tmp_path / "model.safetensors")
    drop = ("encoder.layers.0.experts.", "encoder.layers.0.gate.")
    save_file({k: v for k, v in sd.items() if not k.startswith(drop)}, partial / "model.safetensors")
    loaded, info = CLIPMoE.from_pretrained(partial, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(moe_keys(0)) and not info["unexpected_keys"]
    moe = loaded.encoder.layers[0].mlp
    assert all(torch.equal(getattr(moe, n)[0], getattr(moe, n)[e]) for n in ("w1", "b1", "w2", "b2") for e in range(4))
    assert not moe.b1.any() and not moe.b2.any() and torch.isfinite(moe.w1).all() and moe.gate.weight.abs().sum() > 0
    for k, v in model.state_dict().items():
        if not k.startswith("encoder.layers.0.mlp."):
            assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match=r"missing keys \['encoder\.layers\.0\.mlp\.b1'"):
        cumo.from_pretrained(partial)  # the strict shortcut refuses


def test_can_load_ignoring_mismatched_shapes(tmp_path):
    model = trained(7)  # E = 4
    model.save_pretrained(tmp_path)
    config = cumo.CLIPMoEVisionConfig.from_pretrained(tmp_path)
    config.cumo_moe = {"num_experts": 3, "top_k": 2}
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        CLIPMoE.from_pretrained(tmp_path, config=config)
    loaded, info = CLIPMoE.from_pretrained(
        tmp_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert sorted(k for k, *_ in info["mismatched_keys"]) == sorted(moe_keys(0) + moe_keys(1))
    assert (
        loaded.encoder.layers[1].mlp.w1.shape == (3, 36, 24) and torch.isfinite(loaded.encoder.layers[1].mlp.w1).all()
    )
    for k, v in model.state_dict().items():
        if ".mlp." not in k:
            assert torch.equal(loaded.state_dict()[k], v), k


def test_from_pretrained_no_checkpoint(tmp_path):
    """`from_pretrained(None, config=..., state_dict=...)`: the state dict in either format."""
    model = trained(8)
    assert_same_model(CLIPMoE.from_pretrained(None, config=model.config, state_dict=model.state_dict()), model)
    cumo_keys = to_cumo(model.state_dict(), keep_post_layernorm=True)  # CuMo's layout, `vision_model.` included
    assert "vision_model.encoder.layers.0.experts.2.fc1.weight" in cumo_keys
    assert_same_model(CLIPMoE.from_pretrained(None, config=model.config, state_dict=cumo_keys), model)


def test_cannot_load_with_meta_device_context_manager(tmp_path):
    trained(9).save_pretrained(tmp_path)
    with torch.device("meta"):
        for load in (CLIPMoE.from_pretrained, AutoModel.from_pretrained, cumo.from_pretrained):
            with pytest.raises(RuntimeError, match="meta device context manager"):
                load(tmp_path)


def test_low_cpu_mem_usage_builds_on_meta_and_initialises_nothing_loaded(tmp_path, monkeypatch):
    model = trained(10)
    model.save_pretrained(tmp_path)
    from cumo import _hf

    calls = []
    monkeypatch.setattr(_hf, "init_moe_block", lambda m, c: calls.append(m))
    devices = []
    real = _hf.convert_layer
    monkeypatch.setattr(
        _hf,
        "convert_layer",
        lambda layer, *a, **k: (devices.append(layer.mlp.fc1.weight.device), real(layer, *a, **k))[1],
    )
    loaded = CLIPMoE.from_pretrained(tmp_path, low_cpu_mem_usage=True)
    assert devices and all(d.type == "meta" for d in devices)  # built on meta, filled from the file
    assert calls == []  # no MoE block was initialised: every weight came from the file
    assert_same_model(loaded, model)


def test_attn_implementation_eager_and_sdpa_reload(tmp_path):
    model = trained(11)  # built with the default (sdpa)
    model.save_pretrained(tmp_path)
    x = pixels(seed=12)
    outs = {}
    for impl in ("eager", "sdpa"):
        loaded = CLIPMoE.from_pretrained(tmp_path, attn_implementation=impl)
        assert loaded.config._attn_implementation == impl
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        with torch.no_grad():
            outs[impl] = loaded(x, output_hidden_states=True, output_attentions=impl == "eager")
    assert len(outs["eager"].attentions) == 2
    with torch.no_grad():
        ref = model(x).last_hidden_state
    assert torch.equal(outs["sdpa"].last_hidden_state, ref)
    torch.testing.assert_close(outs["eager"].last_hidden_state, ref, rtol=1e-5, atol=1e-5)


# --- other layouts on disk --------------------------------------------------------------------------


def test_stacked_name_files_load(tmp_path):
    """A file with the parameters' own names (save_original_format=False, or a DeepSpeed ZeRO-3 / FSDP
    consolidated state dict given to save_pretrained) loads too."""
    model = trained(13)
    model.save_pretrained(tmp_path, save_original_format=False)
    assert set(moe_keys(0)) <= saved_keys(tmp_path)
    assert_same_model(CLIPMoE.from_pretrained(tmp_path), model)
    other = tmp_path / "from_state_dict"
    model.save_pretrained(other, state_dict=dict(model.named_parameters()))  # named_parameters: what ZeRO-3 gathers
    assert "encoder.layers.0.experts.0.fc1.weight" in saved_keys(other)  # reverted to CuMo's keys on save
    assert_same_model(CLIPMoE.from_pretrained(other), model)


def test_cumo_tower_files_load(tmp_path):
    """CuMo's own tower checkpoint (`vision_model.` prefix, per-expert keys, no post_layernorm) beside a
    CLIP-MoE config: transformers' loader maps it; post_layernorm is initialised as the identity."""
    model = trained(14)
    with torch.no_grad():  # CuMo's towers have none: the equal reference is the identity LayerNorm
        model.post_layernorm.weight.fill_(1.0)
        model.post_layernorm.bias.zero_()
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in to_cumo(model.state_dict()).items()}, tmp_path / "model.safetensors")
    assert not any(k.startswith("post_layernorm") for k in saved_keys(tmp_path))
    loaded, info = CLIPMoE.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["post_layernorm.bias", "post_layernorm.weight"]
    assert not info["unexpected_keys"]
    assert_same_model(loaded, model)
    assert_same_model(cumo.from_pretrained(tmp_path), model)  # the strict shortcut allows exactly that


def test_converted_hub_checkpoint_saves_cumos_layout(tmp_path):
    """The upcycling path: a dense CLIP from a file in the hub's layout (`vision_model.` prefix), converted,
    saves CuMo's tower layout (`vision_model.encoder.layers.L.experts.i...`) and loads back exactly."""
    dense = tiny_clip(15)
    hub = tmp_path / "hub"
    dense.config.save_pretrained(hub)
    save_file({"vision_model." + k: v for k, v in dense.state_dict().items()}, hub / "model.safetensors")
    model = CLIPVisionModel.from_pretrained(hub)
    assert type(model) is CLIPVisionModel
    cumo.convert_clip_to_moe(model)
    scramble_gates(model, 16)
    model.save_pretrained(tmp_path / "moe")
    keys = saved_keys(tmp_path / "moe")
    assert (
        "vision_model.encoder.layers.1.experts.3.fc1.weight" in keys
        and "vision_model.encoder.layers.0.gate.weight" in keys
    )
    assert all(k.startswith("vision_model.") for k in keys)
    assert_same_model(AutoModel.from_pretrained(tmp_path / "moe"), model)
    assert_same_model(type(model).from_pretrained(tmp_path / "moe"), model)


def test_directory_of_an_earlier_cumo(tmp_path):
    """Written by cumo before the CLIP-MoE classes: a plain CLIP config with `cumo_moe`, CuMo's keys."""
    model = trained(17, num_experts=3, top_k=1)
    config = tiny_config()  # trained() converts tiny_clip(), built from this config
    config.cumo_moe = {"num_experts": 3, "top_k": 1}
    config.architectures = ["CLIPVisionModel"]
    config.save_pretrained(tmp_path)
    sd = {k.removeprefix("vision_model."): v for k, v in to_cumo(model.state_dict(), keep_post_layernorm=True).items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    loaded = cumo.from_pretrained(tmp_path)
    assert type(loaded) is CLIPMoE and loaded.config.cumo_moe == {"num_experts": 3, "top_k": 1}
    assert_same_model(loaded, model)


# --- dense loaders refuse ------------------------------------------------------------------------------


def test_dense_loaders_refuse_without_cumo_imported(tmp_path):
    trained(18).save_pretrained(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        import transformers
        from transformers import AutoModel, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection
        for load in (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel, AutoModel):
            try:
                load.from_pretrained({str(tmp_path)!r})
                print(load.__name__, "LOADED")
            except Exception as exc:
                print(load.__name__, "REFUSED", repr(str(exc)))
        assert "cumo" not in sys.modules
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert set(lines) == {"CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "AutoModel"}
    assert all(v.startswith("REFUSED") for v in lines.values()), lines
    for dense in ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"):
        assert "`import cumo`" in lines[dense] and "cumo.CLIPMoEVisionModel.from_pretrained" in lines[dense]
    assert "cumo_clip_vision_model" in lines["AutoModel"]  # transformers' unknown-model-type error


def test_pipeline_loads_the_moe_tower(tmp_path):
    """transformers' pipeline (AutoModel underneath) on a saved tower with an image processor."""
    image_module = pytest.importorskip("PIL.Image")
    import numpy as np
    from transformers import CLIPImageProcessor, pipeline

    model = trained(27)
    model.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    processor.save_pretrained(tmp_path)
    extract = pipeline("image-feature-extraction", model=str(tmp_path))
    assert type(extract.model) is CLIPMoE
    image = image_module.fromarray((np.random.default_rng(0).random((50, 60, 3)) * 255).astype("uint8"))
    with torch.no_grad():
        want = model(**processor(images=image, return_tensors="pt")).last_hidden_state
    assert torch.equal(torch.tensor(extract(image)), want)


def test_dense_class_refuses_with_cumo_imported(tmp_path):
    trained(19).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="`import cumo`"):
        CLIPVisionModel.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="`import cumo`"):
        CLIPVisionConfig.from_pretrained(tmp_path)


# --- accelerate: device_map, offload, its module walk ----------------------------------------------------


@pytest.mark.parametrize(
    "device_map",
    [
        "cpu",
        "auto",
        {"": "cpu"},
        # offloaded layers: accelerate's hooks load each module's weights before its forward
        {
            "embeddings": "cpu",
            "pre_layrnorm": "cpu",
            "encoder.layers.0": "disk",
            "encoder.layers.1": "disk",
            "post_layernorm": "cpu",
        },
    ],
    ids=["cpu", "auto", "root", "disk-offload"],
)
def test_device_map(tmp_path, device_map):
    pytest.importorskip("accelerate")
    model = trained(20)
    model.save_pretrained(tmp_path)
    loaded = CLIPMoE.from_pretrained(tmp_path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    x = pixels(seed=21)
    with torch.no_grad():
        a = loaded(x, output_hidden_states=True)
        b = model(x, output_hidden_states=True)
        again = loaded(x).last_hidden_state  # offloaded weights load again on the second call
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        assert torch.equal(ha, hb)
    assert torch.equal(again, b.last_hidden_state)
    if isinstance(device_map, dict) and "disk" in device_map.values():
        assert loaded.encoder.layers[1].mlp.w1.device.type == "meta"  # it really is offloaded between calls
    else:
        assert_same_model(loaded, model)


def test_accelerate_walks_the_state_dict_keys(tmp_path):
    """accelerate's set_module_tensor_to_device (what its loaders and dispatch call) reaches every
    state-dict key of a model built on meta; its load_checkpoint_and_dispatch reads a file of the
    parameters' own names (save_original_format=False)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import set_module_tensor_to_device

    model = trained(22)
    with accelerate.init_empty_weights():
        empty = CLIPMoE(model.config)
    assert empty.encoder.layers[0].mlp.w1.device.type == "meta"
    for k, v in model.state_dict().items():
        set_module_tensor_to_device(empty, k, "cpu", value=v)
    assert_same_model(empty.eval(), model)

    model.save_pretrained(tmp_path, save_original_format=False)
    with accelerate.init_empty_weights():
        empty = CLIPMoE(model.config)
    dispatched = accelerate.load_checkpoint_and_dispatch(
        empty, str(tmp_path), device_map={"": "cpu"}, preload_module_classes=["CLIPMoEMLP"]
    )
    assert_same_model(dispatched.eval(), model)


# --- a transformers model holding the tower and a connector ----------------------------------------------


class HostConfig(transformers.PreTrainedConfig):
    model_type = "cumo_test_host"
    sub_configs = {"vision_config": cumo.CLIPMoEVisionConfig}
    vision_config: dict | None = None
    channels: int = 16

    def __post_init__(self, **kwargs):
        if not isinstance(self.vision_config, transformers.PreTrainedConfig):
            self.vision_config = cumo.CLIPMoEVisionConfig(**(self.vision_config or {}))
        super().__post_init__(**kwargs)


class CuMoTestHost(transformers.PreTrainedModel):
    """LLaVA/CuMo-shaped: a CLIP-MoE tower and an MLPMoE connector."""

    config_class = HostConfig

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = CLIPMoE(config.vision_config)
        self.mm_projector = cumo.MLPMoE(4, 2, config.vision_config.hidden_size, config.channels)
        self.post_init()

    def forward(self, pixel_values):
        return self.mm_projector(self.vision_tower(pixel_values).last_hidden_state)[0]


def test_a_host_model_saves_and_loads_both_blocks(tmp_path):
    torch.manual_seed(23)
    host = CuMoTestHost(HostConfig(vision_config=tiny_fields())).eval()
    scramble_gates(host.vision_tower, 24)
    host.save_pretrained(tmp_path / "plain")
    keys = saved_keys(tmp_path / "plain")
    assert "vision_tower.encoder.layers.0.experts.1.fc2.weight" in keys  # the tower's own mapping applies inside
    assert "mm_projector.w1" in keys  # the connector keeps its parameters' names: no mapping registered
    assert_same_model(CuMoTestHost.from_pretrained(tmp_path / "plain"), host)

    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    register_checkpoint_conversion_mapping(CuMoTestHost.__name__, cumo.checkpoint.conversions(), overwrite=True)
    host.save_pretrained(tmp_path / "cumo")
    keys = saved_keys(tmp_path / "cumo")
    assert {"mm_projector.gate.weight", "mm_projector.experts.3.2.bias"} <= keys and "mm_projector.w1" not in keys
    assert "vision_tower.encoder.layers.1.gate.weight" in keys
    assert_same_model(CuMoTestHost.from_pretrained(tmp_path / "cumo"), host)
    assert_same_model(CuMoTestHost.from_pretrained(tmp_path / "plain"), host)  # both layouts load


def test_deepspeed_zero3_loader_converts_cumos_keys():
    """Under DeepSpeed ZeRO-3, from_pretrained loads through transformers' own state-dict conversion
    (`_apply_weight_conversions_to_state_dict`, private: skipped where absent) then each module's
    `_load_from_state_dict`: CuMo's keys must come out as the parameters' names. (5.17 returns a dict,
    5.23 yields one per conversion.)"""
    deepspeed_integration = pytest.importorskip("transformers.integrations.deepspeed")
    convert = getattr(deepspeed_integration, "_apply_weight_conversions_to_state_dict", None)
    if convert is None:
        pytest.skip(f"transformers {transformers.__version__} has no _apply_weight_conversions_to_state_dict")
    from transformers.conversion_mapping import get_model_conversion_mapping

    model = trained(25)
    target = CLIPMoE(model.config)
    out = convert(target, to_cumo(model.state_dict(), keep_post_layernorm=True), get_model_conversion_mapping(target))
    if not isinstance(out, dict):
        out = {k: v for part in out for k, v in part.items()}
    assert sorted(out) == sorted(model.state_dict())  # converted to the parameters' names
    target.load_state_dict(out, strict=True)  # what each module's _load_from_state_dict then does
    assert_same_model(target.eval(), model)


FSDP2_SCRIPT = """
import copy, sys, tempfile, torch, torch.distributed as dist
import cumo
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from test_cumo_hf_loading import trained, assert_same_model

dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
ref = trained(26)
def sharded():
    m = copy.deepcopy(ref)
    for layer in m.encoder.layers:
        fully_shard(layer)
    return fully_shard(m)
m = sharded()
assert type(m.encoder.layers[0].mlp.w1).__name__ == "DTensor"
full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
assert sorted(full) == sorted(ref.state_dict())  # the parameters' names, nothing to translate
d = tempfile.mkdtemp()
m.save_pretrained(d, state_dict=full)  # what a trainer does with FSDP2's full state dict
loaded = cumo.CLIPMoEVisionModel.from_pretrained(d)
assert_same_model(loaded, ref)
m2 = sharded()
set_model_state_dict(m2, loaded.state_dict(), options=StateDictOptions(full_state_dict=True))
x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    assert torch.equal(m2(x).last_hidden_state, ref(x).last_hidden_state)
dist.destroy_process_group()
print("ok")
"""


def test_fsdp2_full_state_dict_saves_and_loads():
    """FSDP2 (fully_shard; gloo, one CPU process): its full state dict has the parameters' names,
    save_pretrained writes CuMo's keys from it, and the loaded state dict goes back into a sharded model."""
    import socket

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", FSDP2_SCRIPT, f"tcp://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --- CLIPModel: cumo.CLIPMoEModel ---------------------------------------------------------------------------


def tiny_clip_model(seed: int) -> torch.nn.Module:
    """A tiny dense CLIPModel: tiny_config()'s tower, a 1-layer text tower of hidden 16."""
    text = transformers.CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=tiny_fields(), projection_dim=8)
    torch.manual_seed(seed)
    return transformers.CLIPModel(config).eval()


def trained_clip_model(seed: int, *, tower_only: bool = False) -> torch.nn.Module:
    """tiny_clip_model converted (whole, or only its `vision_model` with `tower_only`), experts moved apart."""
    model = tiny_clip_model(seed)
    cumo.convert_clip_to_moe(model.vision_model if tower_only else model)
    scramble_gates(model.vision_model, seed + 100)
    perturb_experts(model.vision_model, seed + 200)
    return model


def assert_same_clip_model(got, want, dtype: torch.dtype | None = None) -> None:
    """Every tensor bit for bit with its dtype; the same image and text embeddings, logits and tower
    hidden states (transformers records those from the MoE layers too)."""
    g, w = got.state_dict(), want.state_dict()
    assert sorted(g) == sorted(w), (sorted(set(g) - set(w))[:4], sorted(set(w) - set(g))[:4])
    for k in w:
        assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
    x = pixels(seed=51).to(dtype or next(want.parameters()).dtype)
    ids = torch.tensor([[0, 7, 9, 11, 2], [0, 13, 4, 2, 1]])
    with torch.no_grad():
        a = got(input_ids=ids, pixel_values=x, output_hidden_states=True)
        b = want(input_ids=ids, pixel_values=x, output_hidden_states=True)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    ha, hb = a.vision_model_output.hidden_states, b.vision_model_output.hidden_states
    assert len(ha) == len(hb) == 3 and all(torch.equal(u, v) for u, v in zip(ha, hb, strict=True))


def test_clip_model_converted_in_place_saves_and_loads(tmp_path):
    model = trained_clip_model(30)
    assert type(model) is cumo.CLIPMoEModel and isinstance(model, transformers.CLIPModel)
    assert type(model.config) is cumo.CLIPMoEConfig and type(model.vision_model) is CLIPMoE
    assert model.vision_model.config is model.config.vision_config
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)  # CuMo's per-expert keys under the CLIPModel's own `vision_model.`
    assert {"vision_model.encoder.layers.1.experts.3.fc2.bias", "vision_model.encoder.layers.0.gate.weight"} <= keys
    assert (
        not any(".mlp.w" in k or ".mlp.gate" in k for k in keys)
        and "text_model.encoder.layers.0.mlp.fc1.weight" in keys
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cumo_clip" and config["architectures"] == ["CLIPMoEModel"]
    assert config["vision_config"]["cumo_moe"] == {"num_experts": 4, "top_k": 2}
    for route, load in {
        "CLIPMoEModel": lambda: cumo.CLIPMoEModel.from_pretrained(tmp_path, output_loading_info=True),
        "AutoModel": lambda: AutoModel.from_pretrained(tmp_path, output_loading_info=True),
        "own class": lambda: type(model).from_pretrained(tmp_path, output_loading_info=True),
        "zero-shot": lambda: transformers.AutoModelForZeroShotImageClassification.from_pretrained(
            tmp_path, output_loading_info=True
        ),
    }.items():
        loaded, info = load()
        assert type(loaded) is cumo.CLIPMoEModel and type(loaded.vision_model) is CLIPMoE, route
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (route, info)
        assert loaded.config.vision_config.cumo_moe == {"num_experts": 4, "top_k": 2}, route
        assert_same_clip_model(loaded, model)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    a, b = load_file(tmp_path / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the tower alone, from the CLIPModel's directory (as CLIPVisionModel reads a CLIPModel's)
    tower, info = CLIPMoE.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert_same_model(tower, model.vision_model)


def test_clip_model_fresh_construction_and_config():
    config = cumo.CLIPMoEConfig(
        text_config=tiny_clip_model(0).config.text_config,
        vision_config={**tiny_fields(), "cumo_moe": {"num_experts": 3, "top_k": 1}},
        projection_dim=8,
    )
    assert type(config.vision_config) is cumo.CLIPMoEVisionConfig and config.vision_config.initializer_factor == 1.0
    assert type(AutoConfig.for_model("cumo_clip")) is cumo.CLIPMoEConfig
    again = cumo.CLIPMoEConfig.from_dict(config.to_dict())
    assert again.vision_config.cumo_moe == {"num_experts": 3, "top_k": 1} and again.to_dict() == config.to_dict()
    torch.manual_seed(31)
    model = AutoModel.from_config(config)
    assert type(model) is cumo.CLIPMoEModel and "CLIPMoEEncoderLayer" in model._no_split_modules
    moe = model.vision_model.encoder.layers[0].mlp
    assert isinstance(moe, cumo.CLIPMoEMLP) and moe.w1.shape == (3, 36, 24)
    # initialised as an upcycled fresh CLIP: every expert the same draw, CLIP's MLP std, zero biases
    assert all(torch.equal(moe.w1[0], moe.w1[e]) for e in range(3)) and not moe.b1.any()
    assert abs(moe.w1.std().item() - (2 * 24) ** -0.5) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_model_dtype_is_kept_as_saved(tmp_path, dtype):
    model = trained_clip_model(32).to(dtype)
    model.save_pretrained(tmp_path)
    for route, load in {
        "default": lambda: cumo.CLIPMoEModel.from_pretrained(tmp_path),
        "auto": lambda: cumo.CLIPMoEModel.from_pretrained(tmp_path, dtype="auto"),
        "AutoModel": lambda: AutoModel.from_pretrained(tmp_path),
    }.items():
        loaded = load()
        assert {p.dtype for p in loaded.parameters()} == {dtype}, route
        assert_same_clip_model(loaded, model, dtype)
    upcast = cumo.CLIPMoEModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}


def test_clip_model_sharded_mismatched_and_no_checkpoint(tmp_path):
    model = trained_clip_model(33)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    assert_same_clip_model(cumo.CLIPMoEModel.from_pretrained(tmp_path / "sharded", use_safetensors=True), model)
    # from_pretrained(None, config=, state_dict=): the parameters' names, and CuMo's keys as saved
    for sd in (
        model.state_dict(),
        {k: v for f in (tmp_path / "sharded").glob("*.safetensors") for k, v in load_file(f).items()},
    ):
        assert_same_clip_model(cumo.CLIPMoEModel.from_pretrained(None, config=model.config, state_dict=sd), model)
    # ignore_mismatched_sizes: E = 3 against a file of E = 4
    config = cumo.CLIPMoEConfig.from_pretrained(tmp_path / "sharded")
    config.vision_config.cumo_moe = {"num_experts": 3, "top_k": 2}
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        cumo.CLIPMoEModel.from_pretrained(tmp_path / "sharded", config=config)
    loaded, info = cumo.CLIPMoEModel.from_pretrained(
        tmp_path / "sharded", config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    want = [f"vision_model.{k}" for k in moe_keys(0) + moe_keys(1)]
    assert sorted(k for k, *_ in info["mismatched_keys"]) == sorted(want)
    assert loaded.vision_model.encoder.layers[0].mlp.w1.shape == (3, 36, 24)
    for k, v in model.state_dict().items():
        if ".mlp." not in k or k.startswith("text_model."):
            assert torch.equal(loaded.state_dict()[k], v), k


def test_clip_model_meta_device_low_cpu_mem_attn_and_device_map(tmp_path):
    model = trained_clip_model(34)
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        for load in (cumo.CLIPMoEModel.from_pretrained, AutoModel.from_pretrained):
            with pytest.raises(RuntimeError, match="meta device context manager"):
                load(tmp_path)
    assert_same_clip_model(cumo.CLIPMoEModel.from_pretrained(tmp_path, low_cpu_mem_usage=True), model)
    eager = cumo.CLIPMoEModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.vision_model.config._attn_implementation == "eager"
    assert all(torch.equal(eager.state_dict()[k], v) for k, v in model.state_dict().items())
    x = pixels(seed=54)
    with torch.no_grad():
        torch.testing.assert_close(eager.get_image_features(x), model.get_image_features(x), rtol=1e-5, atol=1e-5)
    pytest.importorskip("accelerate")
    assert_same_clip_model(cumo.CLIPMoEModel.from_pretrained(tmp_path, device_map="cpu"), model)


def test_clip_model_from_a_dense_file_converted(tmp_path):
    """The upcycling path: a dense CLIPModel from its own file, converted, saved, loaded back."""
    tiny_clip_model(35).save_pretrained(tmp_path / "dense")
    model = transformers.CLIPModel.from_pretrained(tmp_path / "dense").eval()
    cumo.convert_clip_to_moe(model)
    scramble_gates(model.vision_model, 36)
    model.save_pretrained(tmp_path / "moe")
    assert "vision_model.encoder.layers.0.experts.3.fc1.weight" in saved_keys(tmp_path / "moe")
    assert_same_clip_model(AutoModel.from_pretrained(tmp_path / "moe"), model)


def test_clip_model_whose_tower_alone_was_converted(tmp_path):
    """convert_clip_to_moe(clip.vision_model): the CLIPModel keeps its class, its config's vision part
    (the tower's own config object) becomes a CLIPMoEVisionConfig: CLIPModel refuses the directory
    (test_dense_clip_loaders_refuse_*), cumo.CLIPMoEModel loads it exactly."""
    model = trained_clip_model(37, tower_only=True)
    assert type(model) is transformers.CLIPModel and type(model.config.vision_config) is cumo.CLIPMoEVisionConfig
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"] == "cumo_clip_vision_model"
    loaded, info = cumo.CLIPMoEModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same_clip_model(loaded, model)
    with pytest.raises(Exception, match="`import cumo`"):
        transformers.CLIPModel.from_pretrained(tmp_path)


def test_clip_for_image_classification_converted_in_place(tmp_path):
    config = tiny_clip_model(0).config
    config.num_labels = 3
    torch.manual_seed(38)
    model = transformers.CLIPForImageClassification(config).eval()
    cumo.convert_clip_to_moe(model)
    scramble_gates(model.vision_model, 39)
    assert type(model) is cumo.CLIPMoEForImageClassification and type(model.config) is cumo.CLIPMoEConfig
    model.save_pretrained(tmp_path)
    assert "vision_model.encoder.layers.0.experts.1.fc1.weight" in saved_keys(tmp_path)
    x = pixels(seed=53)
    for load in (
        cumo.CLIPMoEForImageClassification.from_pretrained,
        transformers.AutoModelForImageClassification.from_pretrained,
    ):
        loaded, info = load(tmp_path, output_loading_info=True)
        assert type(loaded) is cumo.CLIPMoEForImageClassification
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        g, w = loaded.state_dict(), model.state_dict()
        assert sorted(g) == sorted(w) and all(torch.equal(g[k], w[k]) for k in w)
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(Exception, match="`import cumo`"):
        transformers.CLIPForImageClassification.from_pretrained(tmp_path)


# --- LLaVA: a transformers host that builds its tower with AutoModel.from_config ------------------------------


def tiny_llava(seed: int):
    text = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = transformers.LlavaConfig(
        vision_config=tiny_fields(), text_config=text.to_dict(), image_token_index=5, projector_hidden_act="gelu"
    )
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(config).eval()


def llava_logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, *[5] * 9, 7, 8], [1, 9, *[5] * 9, 3]])  # 9 image tokens: 3x3 patches, CLS dropped
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels(batch=2, seed=52)).logits


def test_llava_with_its_tower_converted_saves_and_loads(tmp_path):
    model = tiny_llava(40)
    tower = model.model.vision_tower
    assert tower.config is model.config.vision_config  # AutoModel.from_config keeps the host's object
    cumo.convert_clip_to_moe(tower)
    scramble_gates(tower, 41)
    perturb_experts(tower, 42)
    assert type(tower) is CLIPMoE and type(model.config.vision_config) is cumo.CLIPMoEVisionConfig
    model.save_pretrained(tmp_path)
    assert "vision_tower.encoder.layers.1.experts.2.fc1.weight" in saved_keys(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"] == "cumo_clip_vision_model"
    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(loaded.model.vision_tower) is CLIPMoE  # rebuilt through AutoModel, the tower's mapping nested
    g, w = loaded.state_dict(), model.state_dict()
    assert sorted(g) == sorted(w) and all(g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]) for k in w)
    assert torch.equal(llava_logits(loaded), llava_logits(model))


def test_llava_loaded_from_a_file_then_its_tower_converted(tmp_path):
    """The host's from_pretrained recorded its file's layout (which save_pretrained reverts to) before the
    tower became MoE, and convert_clip_to_moe cannot reach the host: the file holds the parameters'
    names, which load back exactly all the same."""
    tiny_llava(48).save_pretrained(tmp_path / "dense")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "dense").eval()
    cumo.convert_clip_to_moe(model.model.vision_tower)
    scramble_gates(model.model.vision_tower, 49)
    model.save_pretrained(tmp_path / "moe")
    assert "vision_tower.encoder.layers.0.mlp.w1" in saved_keys(tmp_path / "moe")
    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "moe", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    g, w = loaded.state_dict(), model.state_dict()
    assert sorted(g) == sorted(w) and all(torch.equal(g[k], w[k]) for k in w)
    assert torch.equal(llava_logits(loaded), llava_logits(model))


class MyTower(CLIPVisionModel):
    """A user's own CLIPVisionModel subclass."""


def test_a_users_clip_subclass_converted_refuses_dense_and_loads_with_cumo(tmp_path):
    torch.manual_seed(43)
    model = MyTower(tiny_config()).eval()
    cumo.convert_clip_to_moe(model)
    scramble_gates(model, 44)
    assert type(model) is MyTower and type(model.config) is cumo.CLIPMoEVisionConfig
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="`import cumo`"):
        MyTower.from_pretrained(tmp_path)  # its own class builds dense MLPs: refused
    assert_same_model(CLIPMoE.from_pretrained(tmp_path), model)


# --- dense loaders refuse a CLIPModel's, a LLaVA's and a subclass's directory -------------------------------------


def _dirs_of_every_host(tmp_path) -> dict:
    dirs = {"clip": tmp_path / "clip", "clip_tower_only": tmp_path / "tower_only", "llava": tmp_path / "llava"}
    trained_clip_model(45).save_pretrained(dirs["clip"])
    trained_clip_model(46, tower_only=True).save_pretrained(dirs["clip_tower_only"])
    llava = tiny_llava(47)
    cumo.convert_clip_to_moe(llava.model.vision_tower)
    llava.save_pretrained(dirs["llava"])
    return dirs


def test_dense_clip_loaders_refuse_without_cumo_imported(tmp_path):
    dirs = _dirs_of_every_host(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModel, CLIPModel, CLIPVisionModel, LlavaForConditionalGeneration
        routes = [(CLIPModel, "clip"), (CLIPVisionModel, "clip"), (AutoModel, "clip"), (CLIPModel, "clip_tower_only"),
                  (AutoModel, "clip_tower_only"), (LlavaForConditionalGeneration, "llava"), (AutoModel, "llava")]
        dirs = { ({k: str(v) for k, v in dirs.items()})!r}
        for cls, d in routes:
            try:
                cls.from_pretrained(dirs[d])
                print(cls.__name__, d, "LOADED")
            except Exception as exc:
                print(cls.__name__, d, "REFUSED", repr(str(exc)[:2000]))
        assert "cumo" not in sys.modules
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {tuple(line.split(" ", 2)[:2]): line.split(" ", 2)[2] for line in out.stdout.strip().splitlines()}
    assert len(lines) == 7 and all(v.startswith("REFUSED") for v in lines.values()), lines
    for route in [
        ("CLIPModel", "clip"),
        ("CLIPVisionModel", "clip"),
        ("CLIPModel", "clip_tower_only"),
        ("AutoModel", "clip_tower_only"),
    ]:
        assert "`import cumo`" in lines[route] and "cumo.CLIPMoEModel" in lines[route], route
    for route in [("AutoModel", "clip"), ("LlavaForConditionalGeneration", "llava"), ("AutoModel", "llava")]:
        assert "cumo_clip" in lines[route], route  # transformers' unknown-model-type error names it


def test_dense_clip_loaders_refuse_with_cumo_imported(tmp_path):
    dirs = _dirs_of_every_host(tmp_path)
    for d in ("clip", "clip_tower_only"):
        for load in (
            transformers.CLIPModel.from_pretrained,
            transformers.CLIPConfig.from_pretrained,
            CLIPVisionModel.from_pretrained,
        ):
            with pytest.raises(Exception, match="`import cumo`"):
                load(dirs[d])
    with pytest.raises(Exception, match="`import cumo`"):
        AutoModel.from_pretrained(dirs["clip_tower_only"])  # model type clip: a dense CLIPConfig
