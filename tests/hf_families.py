"""Tiny configurations of transformers' MoE families for the tests of `cumo_kernels.hf`: each builds
in milliseconds on the CPU, has at least two decoder layers with experts, sizes that are not
multiples of 16, and an even expert count (the expert-parallel test splits them over 2 ranks).

`FAMILIES[name] = (config class name, keyword arguments)`; `tiny_config(name)` builds the config,
or returns None where this transformers has no such class (the tests skip, saying so).
"""

from __future__ import annotations

FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=20, num_local_experts=5, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        # The shared expert (a dense MLP with a sigmoid gate) runs beside the routed experts.
        "Qwen2MoeConfig",
        dict(
            intermediate_size=40,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=36,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            decoder_sparse_step=1,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=40,
            moe_intermediate_size=20,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            head_dim=8,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(intermediate_size=20, num_experts=8, num_experts_per_tok=4),
    ),
    "deepseek_v3": (
        # first_k_dense_replace=1: layer 0 dense, layers 1-2 MoE with a shared expert; grouped routing.
        "DeepseekV3Config",
        dict(
            num_hidden_layers=3,
            intermediate_size=40,
            moe_intermediate_size=12,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=12,
            q_lora_rank=20,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
    "gpt_oss": (
        # Interleaved gate/up columns, weights stored transposed, biases, clamped SwiGLU.
        "GptOssConfig",
        dict(
            intermediate_size=20,
            num_local_experts=6,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "nemotron_h": (
        # Non-gated relu^2 experts (no kernel of ours: the model's act_fn runs), beside Mamba-2 mixers.
        "NemotronHConfig",
        dict(
            layers_block_type=["moe", "linear_attention", "full_attention", "moe"],
            intermediate_size=40,
            moe_intermediate_size=20,
            moe_shared_expert_intermediate_size=24,
            n_routed_experts=6,
            n_shared_experts=1,
            num_experts_per_tok=2,
            head_dim=8,
            ssm_state_size=8,
            mamba_num_heads=4,
            mamba_head_dim=8,
            n_groups=2,
            chunk_size=8,
            use_mamba_kernels=False,
        ),
    ),
}

_COMMON = dict(
    vocab_size=97,
    hidden_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_config(name: str, **overrides):
    """The family's tiny config (random init is the model's own), or None where this
    transformers lacks the config class."""
    import transformers

    cls_name, kwargs = FAMILIES[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None
    return cls(**{**_COMMON, **kwargs, **overrides})
