"""Rectified flow (linear interpolant) with Euler, Heun and Euler-Maruyama samplers.

    x_t = t * x + (1 - t) * noise,   t in [0, 1],  t = 0 pure noise, t = 1 data,
    target velocity v = dx_t/dt = x - noise; samplers integrate dx/dt = v(x, t) from 0 to 1.

The model receives t unscaled in [0, 1]. Its output must have as many channels as the data.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moedit.diffusion.base import DiffusionObjective, mean_flat, randn_like
from moedit.diffusion.guidance import ModelFn


def _bar(steps: int, progress: bool):
    return tqdm(range(steps), desc="sampling", disable=not progress, leave=False)


class RectifiedFlow(DiffusionObjective):
    objective = "flow"

    def draw_t(self, batch: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        device = generator.device if generator is not None else like.device
        if self.cfg.t_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=device, dtype=like.dtype)
        else:
            n = torch.randn(batch, generator=generator, device=device, dtype=like.dtype)
            t = torch.sigmoid(self.cfg.t_mean + self.cfg.t_std * n)
        return t.to(like.device)

    @staticmethod
    def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t for data x, noise and t (B,)."""
        t = t.view(-1, *[1] * (x.dim() - 1))
        return t * x + (1 - t) * noise

    def noise_level(self, t: Tensor) -> Tensor:
        return 1 - t

    @staticmethod
    def velocity(model: ModelFn, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        out = model(x, t, y)
        if out.shape != x.shape:
            raise ValueError(f"flow model output has shape {tuple(out.shape)}, the input {tuple(x.shape)}: "
                             "rectified flow predicts a velocity with the data's channels (model.learn_sigma = false)")
        return out

    def model_inputs(self, x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.interpolate(x, noise, t), t

    def loss_from_output(self, out: Tensor, x: Tensor, noise: Tensor, t: Tensor, x_t: Tensor) -> dict[str, Tensor]:
        if out.shape != x.shape:
            raise ValueError(f"flow model output has shape {tuple(out.shape)}, the input {tuple(x.shape)}: "
                             "rectified flow predicts a velocity with the data's channels (model.learn_sigma = false)")
        return {"mse": mean_flat((out - (x - noise)) ** 2)}  # (B,)

    def term_names(self, learn_sigma: bool) -> tuple[str, ...]:
        return ("mse",)

    def samplers(self):
        return {"euler": self._euler, "heun": self._heun, "euler_maruyama": self._euler_maruyama}

    def _times(self, x: Tensor, steps: int) -> Tensor:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype, device=x.device)

    def _euler(self, fn: ModelFn, x: Tensor, y, steps: int, generator, progress: bool) -> Tensor:
        times = self._times(x, steps)
        for i in _bar(steps, progress):
            t = times[i].expand(x.shape[0])
            x = x + (times[i + 1] - times[i]) * self.velocity(fn, x, t, y)
        return x

    def _heun(self, fn: ModelFn, x: Tensor, y, steps: int, generator, progress: bool) -> Tensor:
        # Second order (trapezoid with an Euler predictor): two model calls per step.
        times = self._times(x, steps)
        for i in _bar(steps, progress):
            dt = times[i + 1] - times[i]
            v0 = self.velocity(fn, x, times[i].expand(x.shape[0]), y)
            x_pred = x + dt * v0
            v1 = self.velocity(fn, x_pred, times[i + 1].expand(x.shape[0]), y)
            x = x + dt * 0.5 * (v0 + v1)
        return x

    def _euler_maruyama(self, fn: ModelFn, x: Tensor, y, steps: int, generator, progress: bool) -> Tensor:
        # dx = [v + g^2/2 * score] dt + g dW has the ODE's marginals for any g. With
        # g^2 = 2 lam (1 - t) and score = -(x - t v) / (1 - t) (from x_t = t x + (1 - t) noise)
        # the drift is v - lam (x - t v): no 1 / (1 - t) blow-up near the data end.
        lam = self.cfg.sde_noise_scale
        times = self._times(x, steps)
        for i in _bar(steps, progress):
            t_now, dt = times[i], times[i + 1] - times[i]
            v = self.velocity(fn, x, t_now.expand(x.shape[0]), y)
            x = x + dt * (v - lam * (x - t_now * v))
            if i < steps - 1:  # the last step lands on data: no fresh noise there
                x = x + torch.sqrt(2 * lam * (1 - t_now) * dt) * randn_like(x, generator)
        return x
