"""Text conditioning (issue 25): cross-attention against a naive reference, masks, the null caption,
CFG on captions, caption dropout, every router, counts, and a text model through the Trainer."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from moedit.diffusion.guidance import guided
from moedit.models import FLAVORS, build_model, get_flavor
from moedit.models.config import ModelConfig
from moedit.models.flops import count_params, forward_macs
from moedit.models.layers import CrossAttention
from moedit.models.stats import snapshot_routing_stats
from conftest import run_one_then_two_ranks, write_config  # tests/conftest.py

TEXT_TINY = ["tiny-dense-t", "tiny-diffmoe-t", "tiny-tc-t", "tiny-ec-t"]


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Leave the zero init (adaLN gates, cross-attention output) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def text_inputs(cfg: ModelConfig, batch: int = 6, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    lengths = torch.randint(1, cfg.text_len + 1, (batch,), generator=g)
    mask = torch.arange(cfg.text_len)[None] < lengths[:, None]  # (B, L): real tokens first, then padding
    return x, t, text, mask


# --- cross-attention against a naive per-head loop ---------------------------------------------------
def naive_cross_attention(module: CrossAttention, x, context, mask):
    """Per sample, per head: softmax over the real caption tokens only (padded ones skipped)."""
    B, T, D = x.shape
    H, Dh = module.num_heads, module.head_dim
    q_all, kv_all = module.q(x), module.kv(context)
    rows = []
    for b in range(B):
        real = mask[b].nonzero().flatten()
        heads = []
        for h in range(H):
            q = module.q_norm(q_all[b, :, h * Dh:(h + 1) * Dh])  # (T, Dh)
            k = module.k_norm(kv_all[b, real, h * Dh:(h + 1) * Dh])  # (L_real, Dh)
            v = kv_all[b, real, D + h * Dh:D + (h + 1) * Dh]
            weights = torch.softmax(q @ k.T / math.sqrt(Dh), dim=-1)  # (T, L_real)
            heads.append(weights @ v)
        rows.append(torch.cat(heads, dim=-1))
    return module.proj(torch.stack(rows))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cross_attention_matches_naive_reference_with_masks(qk_norm):
    torch.manual_seed(0)
    module = CrossAttention(24, 3, qk_norm=qk_norm).double()
    perturb(module, scale=0.3)  # qk-norm affine away from identity too
    x = torch.randn(3, 10, 24, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)

    out = module(x, context, mask)
    grads = torch.autograd.grad(out.square().sum(), [x, context, *module.parameters()])
    ref = naive_cross_attention(module, x, context, mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, context, *module.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Padded tokens get exactly zero weight: no gradient reaches them, and their features change nothing.
    assert torch.equal(grads[1][~mask], torch.zeros_like(grads[1][~mask]))
    changed = context.detach().clone()
    changed[~mask] = 1e3 * torch.randn_like(changed[~mask])
    assert torch.equal(module(x, changed, mask), out)


def test_padded_caption_features_do_not_change_the_model_and_dropped_captions_ignore_text():
    cfg = dataclasses.replace(get_flavor("tiny-diffmoe-t"), text_pooled=True, learn_sigma=False)
    model = build_model(cfg).double().eval()
    perturb(model)
    x, t, text, mask = text_inputs(cfg, dtype=torch.float64)
    mask[0] = True  # one caption without padding
    out = model(x, t, text=text, text_mask=mask)
    noisy = text.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 100
    assert torch.equal(model(x, t, text=noisy, text_mask=mask), out)  # pooled mean and attention both masked
    drop = torch.tensor([True, False, True, False, False, True])
    dropped = model(x, t, text=text, text_mask=mask, drop_text=drop)
    assert torch.equal(model(x, t, text=torch.randn_like(text), text_mask=mask, drop_text=drop)[drop], dropped[drop])
    assert not torch.allclose(dropped[~drop], model(x, t, text=torch.randn_like(text), text_mask=mask)[~drop])
    # Without text, every sample on the null caption: the same as dropping each caption.
    everyone = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, drop_text=everyone), model(x, t, text=text, text_mask=mask,
                                                                      drop_text=everyone), rtol=0, atol=1e-12)
    # An empty caption (no real token) is no caption: the null caption, not NaN.
    empty = mask.clone()
    empty[1] = False
    out_empty = model(x, t, text=text, text_mask=empty)
    torch.testing.assert_close(out_empty[1], model(x, t, drop_text=everyone)[1], rtol=0, atol=1e-12)


def test_text_model_is_zero_at_init_and_cross_attention_starts_learning():
    cfg = get_flavor("tiny-dense-t")
    model = build_model(cfg)
    x, t, text, mask = text_inputs(cfg)
    out = model(x, t, text=text, text_mask=mask)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero, and the zero cross-attention output
    assert all(torch.equal(b.cross_attn.proj.weight, torch.zeros_like(b.cross_attn.proj.weight)) for b in model.blocks)
    assert model.y_embedder is None and model.caption_embedder.null_caption.shape == (cfg.text_len, cfg.text_dim)


def test_model_input_errors_are_named():
    cfg = get_flavor("tiny-dense-t")
    model = build_model(cfg)
    x, t, text, mask = text_inputs(cfg)
    with pytest.raises(ValueError, match="needs text"):
        model(x, t)
    with pytest.raises(ValueError, match=r"expected \(6, 16, 64\) for model.text_len=16, model.text_dim=64"):
        model(x, t, text=text[:, :8], text_mask=mask[:, :8])
    with pytest.raises(ValueError, match="text_mask has shape"):
        model(x, t, text=text, text_mask=mask.float())


@pytest.mark.parametrize("changes, message", [
    ({"condition": "image"}, r"model.condition = 'image': must be one of class, text"),
    ({"condition": "text"}, r"model.text_dim = 0: a text model needs the encoder's feature width"),
    ({"condition": "text", "text_dim": 64}, r"model.text_len = 0: a text model needs the caption length"),
    ({"condition": "text", "text_dim": 64, "text_len": 8, "caption_dropout": 1.0}, r"model.caption_dropout = 1.0"),
    ({"text_pooled": True}, r"model.text_pooled = True: needs model.condition = text"),
])
def test_config_errors_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_flavor("tiny-dense"), **changes)


# --- every router, counts --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*TEXT_TINY, "tiny-ditmoe"])
def test_every_router_trains_forward_and_backward_with_text(name):
    cfg = get_flavor(name)
    if not cfg.is_text:  # DiT-MoE's shared-expert SwiGLU layout, switched to captions
        cfg = dataclasses.replace(cfg, condition="text", text_dim=64, text_len=16, num_classes=0)
    model = build_model(cfg).train()
    perturb(model)
    x, t, text, mask = text_inputs(cfg)
    out = model(x, t, text=text, text_mask=mask, drop_text=torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool))
    loss = out.square().mean() + sum(model.aux_losses().values(), torch.zeros(()))
    loss.backward()
    for block in model.blocks:
        for p in (block.cross_attn.q.weight, block.cross_attn.kv.weight, block.cross_attn.proj.weight):
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.caption_embedder.null_caption.grad.abs().sum() > 0  # the dropped rows train the null caption
    if cfg.moe is not None:
        stats = snapshot_routing_stats(model)
        for layer in stats["layers"]:
            assert layer["tokens_per_expert_by_class"] is None  # no labels: no per-class rows
            assert sum(layer["tokens_per_expert"]) > 0


def _counted_macs(model, *args, **kwargs) -> float:
    """Multiply-adds torch's FLOP counter sees, without the attention kernels (the `ditmoe` convention)."""
    with FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    ops = counter.get_flop_counts()["Global"]
    return sum(v for op, v in ops.items() if "scaled_dot_product" not in str(op)) / 2


@pytest.mark.parametrize("pooled", [False, True])
def test_text_flops_match_the_instantiated_modules(pooled):
    cfg = dataclasses.replace(get_flavor("tiny-dense-t"), text_pooled=pooled)
    model = build_model(cfg)
    B = 3
    x, t, text, mask = text_inputs(cfg, batch=B)
    assert _counted_macs(model, x, t, text=text, text_mask=mask) / B == forward_macs(cfg, "ditmoe")
    T, L, D = cfg.num_tokens, cfg.text_len, cfg.hidden_size
    attention = cfg.depth * (2 * T * T * D + 2 * T * L * D)  # self- and cross-attention score/value matmuls
    assert forward_macs(cfg, "dit") - forward_macs(cfg, "ditmoe") == attention
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


def test_large_text_flavors_are_t5_xxl_shaped_and_keep_their_class_twins_shape():
    for name in ("DiffMoE-L-E16-T", "TC-DiT-S-E16-T", "EC-DiT-B-E16-T", "Dense-DiT-XL-T"):
        cfg, twin = FLAVORS[name], FLAVORS[name[:-2]]
        assert (cfg.condition, cfg.text_dim, cfg.text_len, cfg.num_classes) == ("text", 4096, 120, 0)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.moe) == (twin.depth, twin.hidden_size, twin.num_heads,
                                                                        twin.moe)
    assert (FLAVORS["tiny-diffmoe-t"].text_dim, FLAVORS["tiny-diffmoe-t"].text_len) == (64, 16)


# --- classifier-free guidance on captions ----------------------------------------------------------
@pytest.mark.parametrize("batching", ["joint", "separate"])
def test_cfg_on_text(batching):
    cfg = dataclasses.replace(get_flavor("tiny-dense-t"), learn_sigma=False)
    model = build_model(cfg).double().eval()
    perturb(model)
    x, t, text, mask = text_inputs(cfg, dtype=torch.float64)
    cond = model(x, t, text=text, text_mask=mask)
    uncond = model(x, t, text=text, text_mask=mask, drop_text=torch.ones(6, dtype=torch.bool))
    assert not torch.allclose(cond, uncond)

    def guide(scale):
        return guided(model, cfg_scale=scale, null_label=None, guidance_channels=cfg.in_channels, interval=None,
                      noise_level=lambda t: 1 - t, batching=batching)

    caption = {"text": text, "text_mask": mask}
    assert torch.equal(guide(1.0)(x, t, caption), cond)  # scale 1: the conditional model exactly
    torch.testing.assert_close(guide(4.0)(x, t, caption), uncond + 4.0 * (cond - uncond), rtol=1e-10, atol=1e-12)
    null_for_both = {**caption, "drop_text": torch.ones(6, dtype=torch.bool)}
    torch.testing.assert_close(guide(4.0)(x, t, null_for_both), uncond, rtol=0, atol=1e-12)


# --- training: caption dropout, the Trainer on the local engine, exact resume ------------------------
class TextFields:
    """Wraps a digits loader into the (x, y, fields) batches of a text dataset: per-label caption
    features (float16) with label-dependent padding, as the data side's loader yields them."""

    def __init__(self, loader, text_len: int, text_dim: int):
        self.loader = loader
        g = torch.Generator().manual_seed(123)
        self.table = torch.randn(10, text_len, text_dim, generator=g).half()
        self.lengths = torch.arange(10) % text_len + 1

    def __iter__(self):
        for x, y, *_ in self.loader:
            mask = torch.arange(self.table.shape[1])[None] < self.lengths[y][:, None]
            yield x, y, {"text": self.table[y], "text_mask": mask, "txt": [f"a handwritten {int(v)}" for v in y]}

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def stats(self):
        return self.loader.stats()


def make_text_trainer(tmp_path, digits_dir, name="run", flavor="tiny-diffmoe-t", sections=None, **train):
    from moedit.data import build_loader
    from moedit.train.config import load_config
    from moedit.train.trainer import Trainer

    class FakeTextTrainer(Trainer):
        def build_data(self):
            data = self.cfg.data
            if hasattr(data, "fields"):
                data = dataclasses.replace(data, fields=[])  # the digits shards hold no text
            loader = build_loader(data, batch_size=self.micro_batch * self.accum_steps, rank=self.engine.data_rank,
                                  world_size=self.world, seed=self.cfg.train.seed)
            m = self.cfg.model
            return TextFields(loader, m.text_len, m.text_dim) if m.is_text else loader

    cfg = {
        "model": {"flavor": flavor, "input_size": 8, "in_channels": 1, "learn_sigma": False},
        "data": {"path": str(digits_dir), "num_workers": 0},
        "diffusion": {"cfg_scale": 2.0},
        "train": {"run_dir": str(tmp_path / name), "steps": 4, "global_batch_size": 8, "micro_batch_size": 4,
                  "num_sample_images": 0, "sample_steps": 2, **train},
        "checkpoint": {"every": 2},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
    }
    return FakeTextTrainer(load_config(write_config(tmp_path / f"{name}.yaml", cfg, sections))).setup()


def test_caption_dropout_rate_and_stream_match_label_dropout(tmp_path, digits_dir):
    text = make_text_trainer(tmp_path, digits_dir, "text")
    text.cfg.model.caption_dropout = 0.3
    labels = make_text_trainer(tmp_path, digits_dir, "labels", flavor="tiny-diffmoe")
    labels.cfg.model.class_dropout_prob = 0.3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    fields = {"text": torch.randn(512, 16, 64, generator=g).half(), "text_mask": torch.ones(512, 16, dtype=torch.bool)}
    text._next_batch = lambda: (x, y, fields)
    labels._next_batch = lambda: (x, y)
    dropped = total = 0
    for step in range(10):
        text.step = labels.step = step
        for with_text, with_labels in zip(text._micro_batches(), labels._micro_batches()):
            assert with_text["text"].dtype == torch.float32 and with_text["text_mask"].dtype == torch.bool
            # The same draw, at the same place of the stream, as label dropout (t and noise too).
            assert torch.equal(with_text["drop_text"], with_labels["y"] == 10)
            assert torch.equal(with_text["t"], with_labels["t"]) and torch.equal(with_text["noise"], with_labels["noise"])
            dropped += int(with_text["drop_text"].sum())
            total += with_text["drop_text"].numel()
    assert total == 5120
    sd = math.sqrt(total * 0.3 * 0.7)
    assert abs(dropped - 0.3 * total) < 4.5 * sd, (dropped, total)
    text.close()
    labels.close()


def test_text_model_trains_through_the_trainer_and_resumes_exactly(tmp_path, digits_dir):
    from safetensors.torch import load_file

    full = make_text_trainer(tmp_path, digits_dir, "full", num_sample_images=4)
    if hasattr(full.cfg.data, "fields"):  # the resolved config asks the loader for the caption fields
        assert full.cfg.data.fields == ["text", "text_mask"]
    assert full.fit() == 0
    assert (tmp_path / "full" / "samples" / "step_0000004.png").is_file()  # guided with the null caption
    rows = [yaml.safe_load(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)

    first = make_text_trainer(tmp_path, digits_dir, "split", steps=2)
    assert first.fit() == 0
    second = make_text_trainer(tmp_path, digits_dir, "split", steps=4)
    assert second.step == 2  # resumed
    assert second.fit() == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "full" / "checkpoints" / "step_0000004" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "step_0000004" / name)
        assert a.keys() == b.keys() and any("cross_attn" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_sampling_cycles_the_prompts_and_guides_against_the_null_caption():
    from moedit.diffusion import DiffusionConfig, build_diffusion
    from moedit.eval.sampling import Captions, SamplingPlan, sample_chunk

    cfg = dataclasses.replace(get_flavor("tiny-dense-t"), learn_sigma=False, input_size=8)
    model = build_model(cfg).eval()
    perturb(model)
    _, _, text, mask = text_inputs(cfg, batch=3)
    captions = Captions(text.half(), mask)
    diffusion = build_diffusion(DiffusionConfig(objective="flow", sampler="euler", sample_steps=2))
    plan = SamplingPlan(num_samples=7, chunk_size=7, batch_size=4, seed=0, num_classes=0, latent_shape=(4, 8, 8),
                        sampler="euler", steps=2, cfg_scale=3.0, guidance_channels=None, captions=captions.digest())
    images = torch.cat([img for img, _ in sample_chunk(plan, 0, model, diffusion, lambda z: z, torch.device("cpu"),
                                                       captions)])
    generator = torch.Generator().manual_seed(plan.chunk_seed(0))
    noise = torch.randn((7, 4, 8, 8), generator=generator)
    rows = torch.arange(4, 7) % 3  # the second batch: images 4, 5, 6 take prompts 1, 2, 0
    expected = diffusion.sample(model, noise[4:], {"text": text.half().float()[rows], "text_mask": mask[rows]},
                                steps=2, sampler="euler", cfg_scale=3.0)
    torch.testing.assert_close(images[4:], expected, rtol=0, atol=0)


def _train_worker(tmp: str, digits: str, name: str, *overrides: str) -> None:
    """Entry point of one training process (the engine test starts two); `overrides`: section.key=value."""
    from pathlib import Path

    from conftest import sections_from_overrides

    # data.split=sample: the ranks' batches together are the one process's batch
    sections = sections_from_overrides(overrides, {"data": {"split": "sample"}})
    assert make_text_trainer(Path(tmp), Path(digits), name, sections=sections).fit() == 0


@pytest.mark.parametrize("engine", [["parallel.engine=ddp"],
                                    ["parallel.engine=deepspeed", "deepspeed.zero_stage=2"]])
def test_two_process_text_model_matches_one_process_with_accumulation(engine, tmp_path, digits_dir):
    """The text batch keys travel through DDP and DeepSpeed: 2 ranks x 4 samples = 1 rank accumulating 2 x 4."""
    from safetensors.torch import load_file

    run_one_then_two_ranks("test_models_text", [str(tmp_path), str(digits_dir)], ["single", "train.micro_batch_size=4"],
                           ["ddp", "train.micro_batch_size=0", *engine])
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert (meta["engine"], meta["world_size"]) == (engine[0].split("=")[1], 2)
    one = load_file(tmp_path / "single" / "checkpoints" / "step_0000004" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "checkpoints" / "step_0000004" / "model.safetensors")
    for name, tensor in one.items():
        if "threshold" not in name:  # accumulation: two EMA threshold updates per step (docs/training.md)
            assert (two[name] - tensor).abs().max() <= 1e-4 * (1 + tensor.abs().max()), name
