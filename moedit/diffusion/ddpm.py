"""DDPM as in DiT: linear or cosine betas, epsilon prediction, optional learned variance with the
hybrid MSE + VLB loss, timestep respacing, ancestral and DDIM samplers.

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),  abar_t = prod_{s <= t} (1 - beta_s),

with t = 0 the least noisy step. The model receives the *original* step index (a float in
[0, num_timesteps)) even when sampling with a respaced schedule. Output channels: C = epsilon with
fixed variance ("fixed large": beta_t, as DiT without learned sigma); 2C = epsilon plus v in
[-1, 1] interpolating the log variance between the posterior variance and beta_t (improved DDPM).
Schedule arithmetic is float64 (numpy); tensors are cast to the data's dtype when used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from moedit.diffusion.base import DiffusionObjective, mean_flat, randn_like
from moedit.diffusion.config import DiffusionConfig
from moedit.diffusion.guidance import ModelFn


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """(T,) float64 betas: DiT's linear schedule or improved DDPM's cosine schedule."""
    if schedule == "linear":
        scale = 1000 / num_timesteps  # keeps abar_T comparable for other T, as DiT/ADM do
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        steps = np.arange(num_timesteps)
        return np.array([min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999) for i in steps])
    raise ValueError(f"noise_schedule = {schedule!r}: use 'linear' or 'cosine'")


def respaced_indices(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` original indices, evenly spread over [0, T - 1] and always ending at T - 1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps = {steps}: must be in 1..{num_timesteps} for ddpm")
    if steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)


@dataclass
class Schedule:
    """Per-step float64 arrays of one (possibly respaced) chain; index k = position in the chain."""

    betas: np.ndarray
    timestep_map: np.ndarray  # chain position -> original step index given to the model

    def __post_init__(self):
        b = self.betas
        self.alphas_cumprod = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at k = 0: the log uses its k = 1 value there (improved DDPM).
        post = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(post[1], post[1:]) if len(b) > 1 else b)
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - b) / (1.0 - self.alphas_cumprod)
        large = np.append(post[1], b[1:]) if len(b) > 1 else b
        self.fixed_log_variance = np.log(large)

    @classmethod
    def respaced(cls, base_betas: np.ndarray, indices: np.ndarray) -> "Schedule":
        """A chain over `indices` whose abar at each kept step equals the original abar there."""
        abar = np.cumprod(1.0 - base_betas)
        kept = abar[indices]
        prev = np.append(1.0, kept[:-1])
        return cls(betas=1.0 - kept / prev, timestep_map=np.asarray(indices, dtype=np.int64))


def _take(arr: np.ndarray, k: Tensor, like: Tensor) -> Tensor:
    """arr[k] as (B, 1, ..., 1) in like's dtype/device."""
    values = torch.as_tensor(arr, dtype=torch.float64)[k.long().cpu()].to(like.device, like.dtype)
    return values.view(-1, *[1] * (like.dim() - 1))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability of the 8-bit bin around x in [-1, 1] (bins of width 2/255; the
    edge bins extend to +-inf) under N(mean, e^(2 log_scale)). Exact normal CDF (DiT uses a tanh
    approximation of it)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(delta)))


class GaussianDiffusion(DiffusionObjective):
    objective = "ddpm"

    def __init__(self, cfg: DiffusionConfig):
        super().__init__(cfg)
        self.num_timesteps = cfg.num_timesteps
        self.base_betas = make_betas(cfg.noise_schedule, cfg.num_timesteps)
        self.full = Schedule(self.base_betas, np.arange(cfg.num_timesteps))
        self._respaced: dict[int, Schedule] = {}

    def schedule(self, steps: int | None = None) -> Schedule:
        """The chain for `steps` sampler steps (None or T = the full training chain)."""
        if steps is None or steps == self.num_timesteps:
            return self.full
        if steps not in self._respaced:
            self._respaced[steps] = Schedule.respaced(self.base_betas, respaced_indices(self.num_timesteps, steps))
        return self._respaced[steps]

    def check_steps(self, steps: int) -> None:
        respaced_indices(self.num_timesteps, steps)

    def noise_level(self, t: Tensor) -> Tensor:
        return t / self.num_timesteps

    def draw_t(self, batch: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device).to(like.device)

    # --- the forward process and its posterior (k indexes `s`) ----------------------------------
    def q_mean_variance(self, x0: Tensor, k: Tensor, s: Schedule | None = None):
        s = s or self.full
        mean = _take(np.sqrt(s.alphas_cumprod), k, x0) * x0
        var = _take(1.0 - s.alphas_cumprod, k, x0)
        return mean, var, _take(np.log(1.0 - s.alphas_cumprod), k, x0)

    def q_sample(self, x0: Tensor, k: Tensor, noise: Tensor, s: Schedule | None = None) -> Tensor:
        s = s or self.full
        return _take(np.sqrt(s.alphas_cumprod), k, x0) * x0 + _take(np.sqrt(1.0 - s.alphas_cumprod), k, x0) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, k: Tensor, s: Schedule | None = None):
        """Mean, variance and clipped log variance of q(x_{k-1} | x_k, x_0)."""
        s = s or self.full
        mean = _take(s.posterior_mean_coef1, k, x_t) * x0 + _take(s.posterior_mean_coef2, k, x_t) * x_t
        return mean, _take(s.posterior_variance, k, x_t), _take(s.posterior_log_variance_clipped, k, x_t)

    def split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps, v or None) from a model output of C or 2C channels."""
        c = x.shape[1]
        if out.shape[1] == 2 * c:
            return out[:, :c], out[:, c:]
        if out.shape[1] == c:
            return out, None
        raise ValueError(f"ddpm model output has {out.shape[1]} channels for {c} data channels: "
                         f"expected {c} (fixed variance) or {2 * c} (model.learn_sigma = true)")

    def p_mean_variance(self, out: Tensor, x_t: Tensor, k: Tensor, s: Schedule | None = None):
        """Model mean, log variance and predicted x_0 of p(x_{k-1} | x_k) from the raw output."""
        s = s or self.full
        eps, v = self.split_output(out, x_t)
        if v is None:
            log_var = _take(s.fixed_log_variance, k, x_t).expand_as(x_t)
        else:
            frac = (v + 1) / 2  # v in [-1, 1] interpolates between the posterior variance and beta
            log_var = frac * _take(np.log(s.betas), k, x_t) + (1 - frac) * _take(s.posterior_log_variance_clipped, k, x_t)
        pred_x0 = self.predict_x0(x_t, k, eps, s)
        mean, _, _ = self.q_posterior(pred_x0, x_t, k, s)
        return mean, log_var, pred_x0

    def predict_x0(self, x_t: Tensor, k: Tensor, eps: Tensor, s: Schedule | None = None) -> Tensor:
        s = s or self.full
        return _take(np.sqrt(1.0 / s.alphas_cumprod), k, x_t) * x_t - _take(np.sqrt(1.0 / s.alphas_cumprod - 1), k, x_t) * eps

    def vb_term(self, x0: Tensor, x_t: Tensor, k: Tensor, out: Tensor, s: Schedule | None = None) -> Tensor:
        """(B,) VLB term in bits per dimension: KL(q(x_{k-1}|x_k,x_0) || p) for k > 0, the
        discretized decoder NLL at k = 0."""
        s = s or self.full
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, k, s)
        mean, log_var, _ = self.p_mean_variance(out, x_t, k, s)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(k.to(x0.device) == 0, nll, kl)

    def model_inputs(self, x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.q_sample(x, t, noise), t.to(x.dtype)

    def term_names(self, learn_sigma: bool) -> tuple[str, ...]:
        return ("mse", "vb") if learn_sigma else ("mse",)

    def loss_from_output(self, out: Tensor, x: Tensor, noise: Tensor, t: Tensor, x_t: Tensor) -> dict[str, Tensor]:
        eps, v = self.split_output(out, x)
        terms = {"mse": mean_flat((noise - eps) ** 2)}  # (B,)
        if v is not None:
            # The VLB term trains only the variance: the mean gets its gradient from the MSE alone.
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_term(x, x_t, t, frozen)
        return terms

    # --- samplers ---------------------------------------------------------------------------
    def samplers(self):
        return {"ddpm": self._ancestral, "ddim": self._ddim}

    def _loop(self, x: Tensor, steps: int, progress: bool):
        s = self.schedule(steps)
        for k in tqdm(range(steps - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
            kk = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
            t_model = torch.full((x.shape[0],), float(s.timestep_map[k]), device=x.device, dtype=x.dtype)
            yield s, k, kk, t_model

    def _ancestral(self, fn: ModelFn, x: Tensor, y, steps: int, generator, progress: bool) -> Tensor:
        for s, k, kk, t_model in self._loop(x, steps, progress):
            mean, log_var, _ = self.p_mean_variance(fn(x, t_model, y), x, kk, s)
            x = mean if k == 0 else mean + torch.exp(0.5 * log_var) * randn_like(x, generator)
        return x

    def _ddim(self, fn: ModelFn, x: Tensor, y, steps: int, generator, progress: bool) -> Tensor:
        eta = self.cfg.ddim_eta
        for s, k, kk, t_model in self._loop(x, steps, progress):
            eps, _ = self.split_output(fn(x, t_model, y), x)
            pred_x0 = self.predict_x0(x, kk, eps, s)
            abar, abar_prev = s.alphas_cumprod[k], s.alphas_cumprod_prev[k]
            sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
            x = math.sqrt(abar_prev) * pred_x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
            if k > 0 and sigma > 0:
                x = x + sigma * randn_like(x, generator)
        return x
