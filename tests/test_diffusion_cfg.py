"""Classifier-free guidance and the errors a user can cause when sampling."""

from __future__ import annotations

import pytest
import torch

from moedit.diffusion import DiffusionConfig, build_diffusion
from moedit.diffusion.guidance import guided

NUM_CLASSES, C = 5, 4


class LabelModel(torch.nn.Module):
    """Per-sample, per-class affine map: batch composition cannot change any row's output."""

    num_classes = NUM_CLASSES

    def __init__(self, out_channels=C):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(NUM_CLASSES + 1, out_channels, generator=g)  # row NUM_CLASSES = null class
        self.b = torch.randn(NUM_CLASSES + 1, out_channels, generator=g)
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        x = x.repeat(1, self.a.shape[1] // x.shape[1], 1, 1)
        return x * self.a[y][:, :, None, None] + t[:, None, None, None] * self.b[y][:, :, None, None]


def inputs(batch=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, 3, 3, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def guide(model, scale, channels=C, interval=None):
    return guided(model, cfg_scale=scale, null_label=NUM_CLASSES, guidance_channels=channels,
                  interval=interval, noise_level=lambda t: 1 - t)


def test_scale_one_is_the_conditional_model_exactly():
    model = LabelModel()
    x, t, y = inputs()
    assert torch.equal(guide(model, 1.0)(x, t, y), model(x, t, y))


def test_scale_zero_is_the_unconditional_model_exactly():
    model = LabelModel()
    x, t, y = inputs()
    assert torch.equal(guide(model, 0.0)(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES)))


def test_guided_channel_subset_and_one_batched_forward():
    model = LabelModel(out_channels=2 * C)  # learned-variance output: guidance must not touch channels >= 3
    x, t, y = inputs()
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES))
    model.batches.clear()
    out = guide(model, 2.5, channels=3)(x, t, y)
    assert model.batches == [2 * x.shape[0]]  # cond and uncond in one forward
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])


class PoolModel(torch.nn.Module):
    """Rows see each other, as in DiffMoE's batch-level token pool: each output row is shifted by
    the mean label of the whole batch, so the batch's composition changes every row's output."""

    num_classes = NUM_CLASSES

    def __init__(self):
        super().__init__()
        self.inner = LabelModel()
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append((x.shape[0], y.tolist()))
        return self.inner(x, t, y) + y.float().mean()


def guide_batched(model, scale, batching, channels=C):
    return guided(model, cfg_scale=scale, null_label=NUM_CLASSES, guidance_channels=channels,
                  interval=None, noise_level=lambda t: 1 - t, batching=batching)


def test_separate_batching_is_two_explicit_forwards_bit_for_bit():
    model = PoolModel()
    x, t, y = inputs()
    null = torch.full_like(y, NUM_CLASSES)
    cond, uncond = model(x, t, y), model(x, t, null)  # the official DiffMoE flow sampler's two calls
    expected = uncond + 2.5 * (cond - uncond)
    model.batches.clear()
    out = guide_batched(model, 2.5, "separate")(x, t, y)
    assert torch.equal(out, expected)
    assert model.batches == [(6, y.tolist()), (6, null.tolist())]  # conditional first, then the null pool


def test_joint_batching_is_one_2b_forward_bit_for_bit():
    model = PoolModel()
    x, t, y = inputs()
    null = torch.full_like(y, NUM_CLASSES)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    model.batches.clear()
    out = guide_batched(model, 2.5, "joint", channels=3)(x, t, y)
    assert model.batches == [(12, y.tolist() + null.tolist())]
    assert torch.equal(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])
    # with a pooled model the two batchings really differ (a per-row model gives the same result)
    separate = guide_batched(model, 2.5, "separate", channels=3)(x, t, y)
    assert (separate - out).abs().max() > 1e-3
    row_model = LabelModel()
    torch.testing.assert_close(guide_batched(row_model, 2.5, "separate")(x, t, y),
                               guide_batched(row_model, 2.5, "joint")(x, t, y), rtol=0, atol=1e-6)


def test_config_batching_drives_sampling_and_a_call_argument_overrides_it():
    x, _, y = inputs()
    model = PoolModel()
    out = build_diffusion(DiffusionConfig(sample_steps=2, cfg_scale=2.0, cfg_batching="separate")).sample(model, x, y)
    assert [rows for rows, _ in model.batches] == [6, 6, 6, 6]  # 2 Euler steps x 2 forwards
    explicit = build_diffusion(DiffusionConfig()).sample(PoolModel(), x, y, steps=2, cfg_scale=2.0,
                                                         cfg_batching="separate")
    assert torch.equal(out, explicit)
    with pytest.raises(ValueError, match="cfg_batching = 'both'"):
        build_diffusion(DiffusionConfig()).sample(model, x, y, steps=2, cfg_scale=2.0, cfg_batching="both")


def test_guidance_interval_in_noise_level():
    model = LabelModel()
    x, _, y = inputs()
    t = torch.tensor([0.05, 0.35, 0.5, 0.75, 0.95, 0.55])  # noise levels 0.95, 0.65, 0.5, 0.25, 0.05, 0.45
    inside = torch.tensor([False, True, True, False, False, True])  # interval [0.4, 0.7]
    out = guide(model, 3.0, interval=(0.4, 0.7))(x, t, y)
    full = guide(model, 3.0)(x, t, y)
    cond = model(x, t, y)
    assert torch.equal(out[inside], full[inside]) and torch.equal(out[~inside], cond[~inside])
    assert not torch.allclose(full[~inside], cond[~inside])
    model.batches.clear()
    guide(model, 3.0, interval=(0.4, 0.7))(x, torch.full((6,), 0.9), y)  # noise level 0.1: outside
    assert model.batches == [6]  # no unconditional forward outside the interval


@pytest.mark.parametrize("objective,sampler", [("flow", "heun"), ("ddpm", "ddim"), ("ddpm", "ddpm")])
def test_sampler_with_scale_zero_equals_sampling_the_null_class(objective, sampler):
    diffusion = build_diffusion(DiffusionConfig(objective=objective))
    x, _, y = inputs()
    guided_run = diffusion.sample(LabelModel(), x, y, steps=4, sampler=sampler, cfg_scale=0.0,
                                  generator=torch.Generator().manual_seed(2))
    null_run = diffusion.sample(LabelModel(), x, torch.full_like(y, NUM_CLASSES), steps=4, sampler=sampler,
                                cfg_scale=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(guided_run, null_run)


def test_config_defaults_drive_sampling():
    cfg = DiffusionConfig(objective="flow", sampler="heun", sample_steps=3, cfg_scale=2.0)
    model = LabelModel()
    x, _, y = inputs()
    out = build_diffusion(cfg).sample(model, x, y)
    assert model.batches == [12] * 6  # heun: 2 calls per step, each a cond+uncond batch
    explicit = build_diffusion(DiffusionConfig()).sample(LabelModel(), x, y, steps=3, sampler="heun", cfg_scale=2.0)
    assert torch.equal(out, explicit)


@pytest.mark.parametrize("objective,kwargs,name", [
    ("flow", {"sampler": "ddim"}, "sampler"),
    ("ddpm", {"sampler": "heun"}, "sampler"),
    ("flow", {"sampler": "nope"}, "nope"),
    ("flow", {"steps": 0}, "steps"),
    ("ddpm", {"steps": 0}, "steps"),
    ("ddpm", {"steps": 1001}, "steps"),
    ("flow", {"steps": 2.5}, "steps"),
    ("flow", {"guidance_channels": C + 1}, "guidance_channels"),
    ("ddpm", {"guidance_channels": 0}, "guidance_channels"),
    ("flow", {"guidance_interval": (0.8, 0.2)}, "guidance_interval"),
    ("flow", {"cfg_scale": float("nan")}, "cfg_scale"),
])
def test_bad_sampling_arguments_raise_value_error_naming_them(objective, kwargs, name):
    diffusion = build_diffusion(DiffusionConfig(objective=objective))
    x, _, y = inputs()
    with pytest.raises(ValueError, match=name):
        diffusion.sample(LabelModel(), x, y, **{"steps": 2, **kwargs})


def test_guidance_needs_labels_and_a_null_label():
    flow = build_diffusion(DiffusionConfig())
    x, _, y = inputs()
    with pytest.raises(ValueError, match="labels"):
        flow.sample(LabelModel(), x, None, steps=2, cfg_scale=1.5)
    with pytest.raises(ValueError, match="null_label"):
        flow.sample(lambda a, b, c: a, x, y, steps=2, cfg_scale=1.5)


def test_output_channel_mismatch_is_named():
    x, _, y = inputs()
    with pytest.raises(ValueError, match="learn_sigma"):
        build_diffusion(DiffusionConfig(objective="flow")).sample(LabelModel(out_channels=2 * C), x, y, steps=1)
    with pytest.raises(ValueError, match="learn_sigma"):
        build_diffusion(DiffusionConfig(objective="ddpm")).sample(LabelModel(out_channels=3 * C), x, y, steps=1)


@pytest.mark.parametrize("kwargs,name", [
    ({"objective": "score"}, "objective"),
    ({"sampler": "ddim"}, "sampler"),
    ({"objective": "ddpm", "t_sampling": "logit_normal"}, "t_sampling"),
    ({"t_std": 0.0}, "t_std"),
    ({"sample_steps": 0}, "sample_steps"),
    ({"objective": "ddpm", "num_timesteps": 100, "sample_steps": 250}, "sample_steps"),
    ({"guidance_channels": 0}, "guidance_channels"),
    ({"guidance_interval": (0.2, 1.5)}, "guidance_interval"),
    ({"noise_schedule": "quadratic"}, "noise_schedule"),
    ({"cfg_batching": "split"}, "cfg_batching"),
])
def test_config_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"diffusion.{name}"):
        DiffusionConfig(**kwargs)
