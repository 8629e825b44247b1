"""cumo: CuMo's model components on top of cumo_kernels (CLIP-MoE vision encoder, MLP-MoE
connector, co-upcycling, checkpoint conversion).

This release ships the kernel library only (`cumo_kernels`); the model components are not
part of it yet. Nothing under `cumo` chooses a backend: it passes `backend=` through.
"""

__all__: list[str] = []
