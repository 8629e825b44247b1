"""Benchmark shapes (DESIGN.md, "Benchmark shapes") and the command-line shape parser.

A shape is one call of the MoE MLP block: T tokens in B samples of N = T / B tokens
(x is [B, N, in]), `in` -> `hidden` -> `out` features, E experts, top-k, an activation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "silu", "relu")


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # T = samples * tokens per sample
    d_in: int
    hidden: int
    d_out: int
    experts: int
    top_k: int
    activation: str
    samples: int = 1  # B; x is [B, T // B, in]
    unsupported: str | None = None  # why this shape cannot run (skipped with this message)
    glu: bool = False  # gated experts (issue 23): the first layer has 2 * hidden rows (gate and up)
    hf_family: str | None = None  # a transformers family's MoE block (the hf-* providers run it)
    bias: bool = True  # expert biases (b1, b2)

    @property
    def tokens_per_sample(self) -> int:
        return self.tokens // self.samples

    def flops(self, pass_: str) -> float:
        """2*T*k*(in*hidden + hidden*out) forward (in*2*hidden for gated experts); forward +
        backward three times that."""
        first = 2 if self.glu else 1
        fwd = 2.0 * self.tokens * self.top_k * (first * self.d_in * self.hidden + self.hidden * self.d_out)
        return fwd if pass_ == "fwd" else 3.0 * fwd

    def min_bytes(self, elem: int) -> float:
        """Fewest bytes the forward must move: x, gate, weights and biases read once, y written once."""
        e, rows1 = self.experts, (2 * self.hidden if self.glu else self.hidden)
        n = self.tokens * self.d_in + e * self.d_in  # x, gate
        n += e * (rows1 * self.d_in + self.d_out * self.hidden)
        if self.bias:
            n += e * (rows1 + self.d_out)
        n += self.tokens * self.d_out  # y
        return float(n * elem)

    def describe(self) -> str:
        gated = f" glu (w1 2x{self.hidden} rows)" if self.glu else ""
        return (
            f"T={self.tokens} ({self.samples}x{self.tokens_per_sample}) in={self.d_in} hidden={self.hidden} "
            f"out={self.d_out} E={self.experts} k={self.top_k} {self.activation}{gated}"
            f"{'' if self.bias else ' no biases'}"
        )


# name: tokens T (samples x tokens per sample), in, hidden, out, E, k, activation
NAMED: dict[str, Shape] = {
    s.name: s
    for s in (
        # CLIP ViT-L/14-336 encoder MLP: samples of 577 tokens.
        Shape("clip-train", 23_080, 1024, 4096, 1024, 4, 2, "quick_gelu", samples=40),
        Shape("clip-infer", 5_770, 1024, 4096, 1024, 4, 2, "quick_gelu", samples=10),
        Shape("clip-train-crops", 20_772, 1024, 4096, 1024, 4, 2, "quick_gelu", samples=36),
        Shape("clip-train-whole", 2_308, 1024, 4096, 1024, 4, 2, "quick_gelu", samples=4),
        # MLP connector: samples of 576 tokens.
        Shape("connector-train", 2_304, 2048, 4096, 4096, 4, 2, "gelu", samples=4),
        Shape("connector-infer", 576, 2048, 4096, 4096, 4, 2, "gelu", samples=1),
        # Gated experts (issue 23; glu: "hidden" is the gated width, w1 [E, 2*hidden, in] holds each
        # expert's gate rows then its up rows). Every provider builds gated experts for them; the
        # hf-* providers run the model's transformers experts class on the same weights.
        Shape("mixtral", 4_096, 4096, 14336, 4096, 8, 2, "silu", glu=True, bias=False),
        Shape("qwen3-moe", 4_096, 2048, 768, 2048, 128, 8, "silu", glu=True, bias=False),
        Shape("olmoe", 4_096, 2048, 1024, 2048, 64, 8, "silu", glu=True, bias=False),
        Shape("gpt-oss", 4_096, 2880, 2880, 2880, 32, 4, "gpt_oss_swiglu", glu=True),
        # One decoder MoE block (router + experts) of a transformers model at 2,048 tokens: the
        # hf-* providers (transformers' experts implementations "cumo", "grouped_mm", "eager").
        Shape("olmoe-layer", 2_048, 2048, 1024, 2048, 64, 8, "swiglu", glu=True, hf_family="olmoe"),
        Shape("qwen3-moe-layer", 2_048, 2048, 768, 2048, 128, 8, "swiglu", glu=True, hf_family="qwen3_moe"),
    )
}
GLU_SHAPES = ("mixtral", "qwen3-moe", "olmoe", "gpt-oss")

# CuMo's shapes first (a run cut short keeps them), then the gated ones, the many-small-experts
# shapes before the few large ones.
DEFAULT_GPU = (
    "clip-train",
    "clip-infer",
    "clip-train-crops",
    "clip-train-whole",
    "connector-train",
    "connector-infer",
    "olmoe",
    "qwen3-moe",
    "gpt-oss",
    "mixtral",
)
# On a CPU the training shapes take minutes per provider: the default is the two inference shapes.
DEFAULT_CPU = ("clip-infer", "connector-infer")


def parse_shape(text: str, samples: int = 1) -> Shape:
    """`T,in,hidden,out,E,k,act` -> Shape (x is [samples, T // samples, in])."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 7:
        raise ValueError(f"--shape {text!r}: expected T,in,hidden,out,E,k,act (7 fields), got {len(parts)}")
    try:
        t, d_in, hidden, d_out, e, k = (int(p) for p in parts[:6])
    except ValueError as exc:
        raise ValueError(f"--shape {text!r}: the first six fields must be integers") from exc
    act = parts[6]
    if act not in ACTIVATIONS:
        raise ValueError(f"--shape {text!r}: activation {act!r} not in {', '.join(ACTIVATIONS)}")
    if min(t, d_in, hidden, d_out, e, k, samples) < 1:
        raise ValueError(f"--shape {text!r}: every size must be >= 1")
    if k > e:
        raise ValueError(f"--shape {text!r}: top-k {k} > experts {e}")
    if t % samples:
        raise ValueError(f"--shape {text!r}: T={t} is not a multiple of --samples {samples}")
    name = f"custom-{t}x{d_in}x{hidden}x{d_out}-E{e}k{k}-{act}"
    return Shape(name, t, d_in, hidden, d_out, e, k, act, samples=samples)


def with_tokens(shape: Shape, tokens: int) -> Shape:
    """`shape` at `tokens` tokens (widths, experts and top-k kept; named `<name>@T<tokens>`): in
    samples of the shape's own length where `tokens` is a multiple of it, else one sample."""
    if tokens < 1:
        raise ValueError(f"--tokens {tokens}: must be >= 1")
    n = shape.tokens_per_sample
    samples = tokens // n if shape.samples > 1 and tokens % n == 0 else 1
    return replace(shape, name=f"{shape.name}@T{tokens}", tokens=tokens, samples=samples)


def quick(shape: Shape) -> Shape:
    """A tiny version of a shape for smoke tests: dims / 16, at most 2 samples of N / 32 tokens."""
    if shape.unsupported:
        return shape
    samples = min(shape.samples, 2)
    n = max(shape.tokens_per_sample // 32, 4)
    return replace(
        shape,
        name=shape.name + "@quick",
        tokens=samples * n,
        samples=samples,
        d_in=max(shape.d_in // 16, 4),
        hidden=max(shape.hidden // 16, 4),
        d_out=max(shape.d_out // 16, 4),
    )
