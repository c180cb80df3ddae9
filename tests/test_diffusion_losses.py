"""The aux-loss path: total_loss weights and sums, training_losses reports every term."""

from __future__ import annotations

import pytest
import torch

from moedit.diffusion import DiffusionConfig, build_diffusion, total_loss
from moedit.diffusion.losses import combine_losses


class AuxModel(torch.nn.Module):
    """A model whose forward leaves auxiliary terms behind, the way the MoE layers do."""

    def __init__(self, out_channels=2):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.out_channels = out_channels
        self._aux = {}

    def forward(self, x, t, y):
        out = self.weight * x.repeat(1, self.out_channels // x.shape[1], 1, 1)
        self._aux = {"balance": self.weight ** 2 * 3.0, "z": self.weight * 0 + 7.0, "predictor": self.weight + 1.0}
        return out

    def aux_losses(self):
        return self._aux

    def aux_loss_coefs(self):
        return {"balance": 0.01, "z": 0.0, "predictor": 1.0}


def test_total_loss_weights_and_reports_every_term():
    terms = {"mse": torch.tensor(2.0), "balance": torch.tensor(3.0), "z": torch.tensor(float("nan"))}
    total, reported = total_loss(terms, {"mse": 1.0, "balance": 0.5, "z": 0.0})
    assert total.item() == 3.5  # the zero-weight NaN diagnostic is reported but not added
    assert reported.keys() == terms.keys() and reported["balance"].item() == 3.0


def test_total_loss_rejects_missing_coefficients_and_non_scalars():
    with pytest.raises(ValueError, match="balance"):
        total_loss({"mse": torch.tensor(1.0), "balance": torch.tensor(1.0)}, {"mse": 1.0})
    with pytest.raises(ValueError, match="mse"):
        total_loss({"mse": torch.ones(3)}, {"mse": 1.0})


@pytest.mark.parametrize("objective,out_channels,terms", [
    ("flow", 2, {"mse"}), ("ddpm", 2, {"mse"}), ("ddpm", 4, {"mse", "vb"})])
def test_training_losses_add_aux_terms_with_their_coefficients(objective, out_channels, terms):
    diffusion = build_diffusion(DiffusionConfig(objective=objective))
    model = AuxModel(out_channels)
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)
    losses = diffusion.training_losses(model, x, y, generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"loss"} | terms | {"balance", "z", "predictor"}
    expected = sum(losses[name] for name in terms) + 0.01 * losses["balance"] + losses["predictor"]
    torch.testing.assert_close(losses["loss"], expected, rtol=0, atol=1e-6)
    # the aux terms carry gradient into the model through the total
    (grad,) = torch.autograd.grad(losses["loss"], model.weight, retain_graph=True)
    (grad_objective,) = torch.autograd.grad(sum(losses[n] for n in terms), model.weight)
    torch.testing.assert_close(grad - grad_objective, torch.tensor(0.01 * 6 * 0.5 + 1.0))


def test_training_losses_are_reproducible_from_the_generator():
    diffusion = build_diffusion(DiffusionConfig(objective="flow", t_sampling="logit_normal"))
    x = torch.randn(8, 2, 3, 3)
    run = lambda seed: diffusion.training_losses(AuxModel(), x, None, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3)["mse"], run(3)["mse"]) and not torch.equal(run(3)["mse"], run(4)["mse"])


def test_aux_terms_are_found_through_a_data_parallel_wrapper_and_must_not_clash():
    wrapper = torch.nn.Module()
    wrapper.module = AuxModel()
    wrapper.module(torch.ones(1, 2, 1, 1), torch.zeros(1), None)
    out = combine_losses({"mse": torch.tensor(1.0)}, wrapper)
    assert out["predictor"].item() == 1.5 and out["loss"].item() == pytest.approx(1.0 + 0.01 * 0.75 + 1.5)
    with pytest.raises(ValueError, match="balance"):
        combine_losses({"balance": torch.tensor(1.0)}, wrapper)
