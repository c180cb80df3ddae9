"""What rectified flow and DDPM share: argument checking, guidance set-up and the loss path."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from moedit.diffusion.config import DiffusionConfig, check_cfg_batching, check_interval, check_sampler
from moedit.diffusion.guidance import ModelFn, call_model, check_guidance_channels, guided, is_text_condition
from moedit.diffusion.losses import combine_losses


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like `x`, drawn on the generator's device (so a CPU generator
    gives the same numbers whatever device `x` lives on)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def mean_flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B,): mean over all but the batch dimension."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class DiffusionObjective:
    """Base of `RectifiedFlow` and `GaussianDiffusion`; subclasses fill in the hooks below."""

    objective: str = ""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    # --- hooks --------------------------------------------------------------------------------
    def draw_t(self, batch: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        raise NotImplementedError

    def model_inputs(self, x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, t as the model receives it) for data x, noise and t (B,)."""
        raise NotImplementedError

    def loss_from_output(self, out: Tensor, x: Tensor, noise: Tensor, t: Tensor, x_t: Tensor) -> dict[str, Tensor]:
        """Per-sample objective terms, each (B,), from the model's output on `model_inputs`."""
        raise NotImplementedError

    def term_names(self, learn_sigma: bool) -> tuple[str, ...]:
        """Names of the terms `loss_from_output` returns (learn_sigma: the model predicts a variance)."""
        raise NotImplementedError

    def loss_terms(self, model: ModelFn, x: Tensor, y: Tensor | None, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-sample objective terms, each (B,), for given t and noise: `model_inputs`, the model,
        then `loss_from_output`. Engines that run the model themselves (a pipeline schedule) call
        the two halves."""
        x_t, t_model = self.model_inputs(x, noise, t)
        return self.loss_from_output(call_model(model, x_t, t_model, y), x, noise, t, x_t)

    def noise_level(self, t: Tensor) -> Tensor:
        """Model time -> noise level in [0, 1], 1 = pure noise."""
        raise NotImplementedError

    def samplers(self) -> dict[str, Callable[..., Tensor]]:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def training_losses(self, model: Any, x: Tensor, y: Tensor | None,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """{"loss": total incl. the model's weighted aux terms, and every term (batch means)}."""
        t = self.draw_t(x.shape[0], generator, x)
        noise = randn_like(x, generator)
        terms = {name: value.mean() for name, value in self.loss_terms(model, x, y, t, noise).items()}
        return combine_losses(terms, model)

    @torch.no_grad()
    def sample(self, model: ModelFn, noise: Tensor, y: Tensor | None, steps: int | None = None,
               sampler: str | None = None, cfg_scale: float | None = None, *,
               guidance_channels: int | None = None, guidance_interval: tuple[float, float] | None = None,
               cfg_batching: str | None = None, null_label: int | None = None,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """Samples (B, C, H, W) from `noise` (B, C, H, W); arguments left None take the config's value.

        `cfg_batching` "joint" | "separate": how guidance batches its two forwards (docs/diffusion.md).
        `null_label` is the unconditional label for guidance (default: `model.num_classes`, else
        `model.cfg.num_classes`). For a text model `y` is `{"text": (B, L, W), "text_mask": (B, L)}`
        and guidance contrasts it with the null caption (`drop_text` all true; moedit.diffusion.guidance).
        `generator` drives the noise of stochastic samplers (euler_maruyama, ddpm, ddim with eta > 0).
        """
        cfg = self.cfg
        sampler = cfg.default_sampler if sampler is None else sampler
        check_sampler(self.objective, sampler)
        steps = cfg.sample_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps = {steps!r}: must be an integer >= 1")
        self.check_steps(steps)
        scale = cfg.cfg_scale if cfg_scale is None else float(cfg_scale)
        if not math.isfinite(scale):
            raise ValueError(f"cfg_scale = {scale}: must be finite")
        channels = check_guidance_channels(
            cfg.guidance_channels if guidance_channels is None else guidance_channels, noise.shape[1])
        interval = cfg.guidance_interval if guidance_interval is None else tuple(guidance_interval)
        if interval is not None:
            check_interval(interval)
        batching = cfg.cfg_batching if cfg_batching is None else cfg_batching
        check_cfg_batching(batching)
        if scale != 1.0 and not is_text_condition(y):
            if y is None:
                raise ValueError(f"cfg_scale = {scale} needs class labels y (guidance contrasts them with the null label)")
            if null_label is None:  # duck-typed: `model.num_classes` or `model.cfg.num_classes`
                null_label = getattr(model, "num_classes", getattr(getattr(model, "cfg", None), "num_classes", None))
            if null_label is None:
                raise ValueError(f"cfg_scale = {scale} needs null_label (the model's num_classes)")
        fn = guided(model, cfg_scale=scale, null_label=null_label, guidance_channels=channels,
                    interval=interval, noise_level=self.noise_level, batching=batching)
        return self.samplers()[sampler](fn, noise, y, steps, generator, progress)

    def check_steps(self, steps: int) -> None:
        """Objective-specific limits on the number of sampler steps."""
