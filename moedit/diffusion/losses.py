"""The one place where loss terms are weighted and summed.

The objective contributes its own terms (flow: `mse`; DDPM: `mse`, plus `vb` with learned
variance), each with weight 1. A model may add auxiliary terms: after a training forward,
`model.aux_losses()` returns them unweighted (e.g. `balance`, `z`, `predictor`, each summed over
MoE layers) and `model.aux_loss_coefs()` their weights. `total_loss` forms

    loss = sum over terms of coef[name] * term[name]

and every term is reported separately, unweighted, next to the total.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def total_loss(terms: dict[str, Tensor], coefs: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of scalar `terms`; returns (total, terms). Every term needs a coefficient.

    A coefficient of 0 leaves the term out of the total (so a non-finite diagnostic term cannot
    poison it) but it is still reported.
    """
    if not terms:
        raise ValueError("total_loss: no loss terms given")
    missing = sorted(set(terms) - set(coefs))
    if missing:
        raise ValueError(f"total_loss: no coefficient for term(s) {', '.join(missing)}; "
                         f"coefficients given for {', '.join(sorted(coefs)) or 'none'}")
    total = None
    for name, value in terms.items():
        if value.dim() != 0:
            raise ValueError(f"total_loss: term '{name}' has shape {tuple(value.shape)}; terms must be scalars")
        coef = float(coefs[name])
        if coef == 0.0:
            continue
        contribution = value if coef == 1.0 else coef * value
        total = contribution if total is None else total + contribution
    if total is None:  # every coefficient was 0
        total = torch.zeros((), dtype=next(iter(terms.values())).dtype, device=next(iter(terms.values())).device)
    return total, dict(terms)


def model_aux_losses(model: Any) -> tuple[dict[str, Tensor], dict[str, float]]:
    """(terms, coefs) from `model.aux_losses()` / `model.aux_loss_coefs()`; empty when it has none.

    A data-parallel wrapper (DistributedDataParallel) keeps the network in `.module`, so look there too.
    """
    for candidate in (model, getattr(model, "module", None)):
        if candidate is not None and hasattr(candidate, "aux_losses"):
            terms = dict(candidate.aux_losses())
            coefs = dict(candidate.aux_loss_coefs()) if hasattr(candidate, "aux_loss_coefs") else {}
            return terms, coefs
    return {}, {}


def combine_losses(objective_terms: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    """{"loss": total, <objective terms>, <aux terms>}: objective terms weigh 1, aux terms as the model says."""
    aux_terms, aux_coefs = model_aux_losses(model)
    clash = sorted(set(aux_terms) & set(objective_terms))
    if clash:
        raise ValueError(f"model.aux_losses() returned term(s) {', '.join(clash)}, which the objective "
                         "already uses; rename them in the model")
    coefs = {name: 1.0 for name in objective_terms}
    coefs.update(aux_coefs)
    total, terms = total_loss({**objective_terms, **aux_terms}, coefs)
    return {"loss": total, **terms}
