"""`python -m benchmarks.glu_cpu [ARGS]`: kept as an alias of the benchmark CLI's gated CPU run,

    python -m benchmarks --device cpu --shapes olmoe,qwen3-moe --providers cumo-torch,dense,hf-eager \
        --passes fwd [ARGS]

(later arguments win: `--passes fwd,fwd+bwd`, `--tokens 1024`, `--reps 5`, `--threads 2`, ...).
The gated shapes are first-class in `python -m benchmarks` (benchmarks/README.md): cumo-torch is
`moe_mlp(..., glu=True, backend="torch")`, dense the same FLOPs as plain GEMMs, hf-eager
transformers' experts class of the model, eager, on the same weights after the same router.
"""

from __future__ import annotations

import sys

from .cli import main as cli_main

DEFAULTS = ["--device", "cpu", "--shapes", "olmoe,qwen3-moe", "--providers", "cumo-torch,dense,hf-eager"]
DEFAULTS += ["--passes", "fwd"]


def main(argv: list[str] | None = None) -> int:
    return cli_main(DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
