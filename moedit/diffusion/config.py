"""The `diffusion` config section: objective, training-time sampling of t, sampler defaults, guidance.

Time convention (docs/diffusion.md): for rectified flow t = 0 is pure noise and t = 1 is data;
for DDPM the model sees the integer step index in [0, num_timesteps), 0 = clean. Guidance
intervals are given in *noise level* (1 = pure noise), which means the same thing for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FLOW_SAMPLERS = ("euler", "heun", "euler_maruyama")
DDPM_SAMPLERS = ("ddpm", "ddim")
DEFAULT_SAMPLER = {"flow": "euler", "ddpm": "ddpm"}
CFG_BATCHING = ("joint", "separate")


@dataclass
class DiffusionConfig:
    objective: Literal["flow", "ddpm"] = "flow"
    """flow: rectified flow, x_t = t * x + (1 - t) * noise, velocity target x - noise (DiffMoE).
    ddpm: DiT's discrete diffusion with epsilon prediction; a model with 2C output channels
    learns the variance too (hybrid MSE + VLB loss), one with C channels uses fixed variance."""
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """Flow only: training t ~ U(0, 1), or t = sigmoid(t_mean + t_std * N(0, 1)). DDPM draws the
    step index uniformly."""
    t_mean: float = 0.0
    """Logit-normal location, on this t (1 = data): SD3's mean m (given on noise level) is -m here."""
    t_std: float = 1.0
    """Logit-normal scale (> 0)."""
    noise_schedule: Literal["linear", "cosine"] = "linear"
    """DDPM betas: linear 1e-4 -> 0.02 (scaled by 1000 / num_timesteps, as DiT) or cosine (improved DDPM)."""
    num_timesteps: int = 1000
    """DDPM training steps; sampling respaces them to `sample_steps`."""
    sampler: str | None = None
    """Default sampler: flow euler | heun | euler_maruyama; ddpm ddpm (ancestral) | ddim.
    None = euler for flow, ddpm for ddpm."""
    sample_steps: int = 250
    """Default number of sampler steps (DiT: 250). Heun calls the model twice per step."""
    sde_noise_scale: float = 1.0
    """Euler-Maruyama only: lambda in g(t)^2 = 2 * lambda * (1 - t); 0 gives the Euler ODE sampler."""
    ddim_eta: float = 0.0
    """DDIM only: 0 = deterministic, 1 = ancestral-like noise."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale; 1 = conditional model only (one forward per step)."""
    guidance_channels: int | None = None
    """Guide only the first this many output channels (DiT guides 3 of its 4 latent channels);
    None = all channels."""
    guidance_interval: tuple[float, float] | None = None
    """Apply guidance only while the noise level is in [low, high] (noise level = 1 - t for flow,
    step / num_timesteps for DDPM); outside it the conditional model alone is used. None = always."""
    cfg_batching: Literal["joint", "separate"] = "joint"
    """How guidance calls the model: `joint` = conditional and unconditional inputs as one batch of
    2B (DiT's forward_with_cfg); `separate` = two forwards of B, conditional first (the official
    DiffMoE flow sampler). Same result for per-token models; a router that picks tokens from the
    whole batch pool (DiffMoE) routes differently (docs/diffusion.md)."""

    def __post_init__(self):
        if self.objective not in ("flow", "ddpm"):
            raise ValueError(f"diffusion.objective = {self.objective!r}: use 'flow' or 'ddpm'")
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"diffusion.t_sampling = {self.t_sampling!r}: use 'uniform' or 'logit_normal'")
        if self.objective == "ddpm" and self.t_sampling != "uniform":
            raise ValueError(f"diffusion.t_sampling = {self.t_sampling!r}: DDPM draws steps uniformly; "
                             "use 'uniform' or objective 'flow'")
        if not self.t_std > 0:
            raise ValueError(f"diffusion.t_std = {self.t_std}: must be > 0")
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"diffusion.noise_schedule = {self.noise_schedule!r}: use 'linear' or 'cosine'")
        if self.num_timesteps < 2:
            raise ValueError(f"diffusion.num_timesteps = {self.num_timesteps}: must be >= 2")
        if self.sampler is not None:
            check_sampler(self.objective, self.sampler, where="diffusion.sampler")
        if self.sample_steps < 1:
            raise ValueError(f"diffusion.sample_steps = {self.sample_steps}: must be >= 1")
        if self.objective == "ddpm" and self.sample_steps > self.num_timesteps:
            raise ValueError(f"diffusion.sample_steps = {self.sample_steps}: at most num_timesteps "
                             f"({self.num_timesteps}) for ddpm")
        if self.sde_noise_scale < 0 or self.ddim_eta < 0:
            raise ValueError("diffusion.sde_noise_scale and diffusion.ddim_eta must be >= 0")
        if self.guidance_channels is not None and self.guidance_channels < 1:
            raise ValueError(f"diffusion.guidance_channels = {self.guidance_channels}: must be >= 1 or null (all)")
        if self.guidance_interval is not None:
            check_interval(self.guidance_interval, where="diffusion.guidance_interval")
        check_cfg_batching(self.cfg_batching, where="diffusion.cfg_batching")

    @property
    def default_sampler(self) -> str:
        """The sampler used when none is named."""
        return self.sampler or DEFAULT_SAMPLER[self.objective]


def check_sampler(objective: str, sampler: str, where: str = "sampler") -> None:
    """ValueError unless `sampler` belongs to `objective`."""
    valid = FLOW_SAMPLERS if objective == "flow" else DDPM_SAMPLERS
    if sampler not in valid:
        raise ValueError(f"{where} = {sampler!r}: unknown sampler for objective '{objective}'; "
                         f"use one of {', '.join(valid)}")


def check_interval(interval, where: str = "guidance_interval") -> None:
    """ValueError unless `interval` is (low, high) with 0 <= low <= high <= 1."""
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"{where} = {tuple(interval)}: must be (low, high) noise levels with 0 <= low <= high <= 1")


def check_cfg_batching(batching, where: str = "cfg_batching") -> None:
    """ValueError unless `batching` is 'joint' or 'separate'."""
    if batching not in CFG_BATCHING:
        raise ValueError(f"{where} = {batching!r}: use 'joint' (one forward of 2B) or 'separate' "
                         "(conditional and unconditional forwards of B each)")
