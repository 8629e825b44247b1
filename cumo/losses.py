"""CuMo's auxiliary-loss aggregation: for each of the two MoE places (vision encoder, connector)
the training loss adds `0.1 * balance + 0.01 * z` (CUMO.md)."""

from __future__ import annotations

from torch import Tensor

BALANCE_COEF = 0.1
Z_COEF = 0.01


def aux_loss(
    *places: tuple[Tensor, Tensor] | None, balance_coef: float = BALANCE_COEF, z_coef: float = Z_COEF
) -> Tensor:
    """Sum over places of `balance_coef * balance + z_coef * z`, a float32 scalar to add to the LM loss.

    Each place is a `(balance, z)` pair: the vision encoder's from `cumo.collect_aux_losses` (the
    mean over its layers) or `cumo.MultiScaleVisionTower` (also over the scales), the connector's
    from `MLPMoE`'s forward. `None` places are skipped (a dense part). As in CuMo, each product is
    taken in the loss's own dtype (balance float32, z the activation dtype) and then added in float32.

        loss = lm_loss + cumo.aux_loss(collect_aux_losses(tower), (conn_balance, conn_z))
    """
    for i, p in enumerate(places):
        if p is not None and not (
            isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(t, Tensor) for t in p)
        ):
            got = type(p).__name__ + (f" of {len(p)}" if isinstance(p, (tuple, list)) else "")
            raise TypeError(
                f"aux_loss: place {i}: expected a (balance, z) pair of tensors or None, got {got}; "
                "call aux_loss((balance, z), ...) with one pair per MoE place"
            )
    pairs = [p for p in places if p is not None]
    if not pairs:
        raise ValueError("aux_loss: no (balance, z) pair given")
    total = None
    for balance, z in pairs:
        term = (balance_coef * balance).float() + (z_coef * z).float()
        total = term if total is None else total + term
    return total
