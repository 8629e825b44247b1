"""Co-upcycling (CUMO.md): a dense MLP becomes an MoE block whose every expert is an exact copy of
it and whose gate is freshly initialised. With renormalised top-k weights the block then computes
what the dense MLP computed, whatever the gate says."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import CLIPMoEMLP, MLPMoE

# Hugging Face `config.hidden_act` names -> cumo_kernels activations (only exact equivalents).
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
# Activation modules (torch's and Hugging Face's, by class name) -> cumo_kernels activations.
_MODULE_ACTIVATIONS = {
    "QuickGELUActivation": "quick_gelu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "ReLU": "relu",
}


def activation_name(act: nn.Module | None = None, hidden_act: str | None = None) -> str:
    """The cumo_kernels activation equal to a Hugging Face `hidden_act` name or an activation module."""
    if isinstance(hidden_act, str):
        if hidden_act not in HF_ACTIVATIONS:
            raise ValueError(
                f"hidden_act: {hidden_act!r} has no exact cumo_kernels twin; accepted: {sorted(HF_ACTIVATIONS)}"
            )
        return HF_ACTIVATIONS[hidden_act]
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) not in (None, nn.functional.gelu):
        raise ValueError("activation: a GELUActivation with the Python formula; use config.hidden_act")
    if name in _MODULE_ACTIVATIONS:
        return _MODULE_ACTIVATIONS[name]
    raise ValueError(
        f"activation: {name} has no exact cumo_kernels twin; accepted: nn.GELU, {sorted(_MODULE_ACTIVATIONS)}"
    )


@torch.no_grad()
def _fill(moe: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> nn.Module:
    """Every expert := (fc1, fc2); the gate := a fresh nn.Linear initialisation. `moe` is on meta."""
    moe.to_empty(device=fc1.weight.device)
    for dst, src in ((moe.w1, fc1.weight), (moe.b1, fc1.bias), (moe.w2, fc2.weight), (moe.b2, fc2.bias)):
        dst.copy_(src.detach().unsqueeze(0).expand_as(dst))
        dst.requires_grad_(src.requires_grad)
    moe.gate.reset_parameters()
    return moe


def _check_linears(fc1: object, fc2: object, what: str) -> tuple[nn.Linear, nn.Linear]:
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise TypeError(f"{what}: expected two nn.Linear layers, got {type(fc1).__name__}, {type(fc2).__name__}")
    if fc1.bias is None or fc2.bias is None:
        raise ValueError(f"{what}: CuMo's experts have biases; the dense linears must have them too")
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"{what}: fc2.in_features={fc2.in_features} != fc1.out_features={fc1.out_features}")
    if fc1.weight.dtype != fc2.weight.dtype or fc1.weight.device != fc2.weight.device:
        raise ValueError(f"{what}: both linears must share dtype and device")
    return fc1, fc2


def upcycle_mlp(
    dense: nn.Module, *, num_experts: int = 4, top_k: int = 2, backend: str | None = None
) -> MLPMoE | CLIPMoEMLP:
    """Co-upcycle a dense MLP into an MoE block (every expert an exact copy, the gate fresh).

    Args:
        dense: CuMo's dense connector ("mlp2x_gelu"), `nn.Sequential(nn.Linear(a, b), nn.GELU(),
            nn.Linear(b, b))` -> `MLPMoE(num_experts, top_k, a, b)`; or a Hugging Face `CLIPMLP`
            (anything with `fc1`, `fc2` nn.Linear and `activation_fn` or `config.hidden_act`) ->
            `CLIPMoEMLP` with the same activation.
        num_experts, top_k: E and k (CuMo: 4 and 2).
        backend: passed through to the kernels (None: $CUMO_KERNELS_BACKEND, else "auto").

    Returns the new module, on the dense one's device and dtype; `dense` is not modified (the
    experts are copies). Raises ValueError where CuMo's block cannot express the dense MLP (no
    biases, an activation other than exact GELU for the connector, second linear not square).
    """
    if isinstance(dense, nn.Sequential):
        if len(dense) != 3:
            raise ValueError(f"dense: expected nn.Sequential(Linear, GELU, Linear), got {len(dense)} modules")
        fc1, fc2 = _check_linears(dense[0], dense[2], "dense")
        act = activation_name(dense[1])
        if act != "gelu":
            raise ValueError(f"dense: CuMo's MLPMoE experts use exact (erf) nn.GELU(), got {type(dense[1]).__name__}")
        if fc2.out_features != fc2.in_features:
            raise ValueError(
                f"dense: CuMo's MLPMoE experts are Linear(mm_channels, channels), Linear(channels, channels); "
                f"got a second linear {fc2.in_features} -> {fc2.out_features}"
            )
        moe = MLPMoE(
            num_experts,
            top_k,
            fc1.in_features,
            fc1.out_features,
            backend=backend,
            device="meta",
            dtype=fc1.weight.dtype,
        )
        return _fill(moe, fc1, fc2)
    if hasattr(dense, "fc1") and hasattr(dense, "fc2"):
        fc1, fc2 = _check_linears(dense.fc1, dense.fc2, "dense")
        if fc2.out_features != fc1.in_features:
            raise ValueError(f"dense: a CLIP MLP maps hidden -> hidden; got {fc1.in_features} -> {fc2.out_features}")
        hidden_act = getattr(getattr(dense, "config", None), "hidden_act", None)
        act = activation_name(getattr(dense, "activation_fn", None), hidden_act)
        moe = CLIPMoEMLP(
            fc1.in_features,
            fc1.out_features,
            num_experts=num_experts,
            top_k=top_k,
            activation=act,
            backend=backend,
            device="meta",
            dtype=fc1.weight.dtype,
        )
        return _fill(moe, fc1, fc2)
    raise TypeError(
        f"dense: expected nn.Sequential(Linear, GELU, Linear) or a CLIP MLP with fc1/fc2, got {type(dense).__name__}"
    )
