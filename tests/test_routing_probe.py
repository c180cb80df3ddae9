"""On-the-fly accumulation, traces and the offline probe on a real tiny model."""

import json
import math

import numpy as np
import pytest
import torch

from moedit.analysis.routing import probe as routing_probe, trace as routing_trace
from moedit.analysis.routing.accumulate import RoutingAccumulator
from moedit.errors import MoeditError

EDGES = [0.0, 0.25, 0.5, 0.75, 1.0]



def _record(block, selected, noise, labels, scores=None, prob=None, router="diffmoe"):
    selected = np.ascontiguousarray(selected, bool)
    return {"block": block, "router": router, "num_experts": selected.shape[1],
            "selected": torch.from_numpy(selected), "noise_level": torch.tensor(noise).float(),
            "labels": torch.tensor(labels).long(),
            "scores": None if scores is None else torch.tensor(scores).float(),
            "predictor_prob": None if prob is None else torch.tensor(prob).float()}


def test_deterministic_noise_to_expert_map_gives_log_bins():
    bins = len(EDGES) - 1
    acc = RoutingAccumulator(EDGES, capacity=1.0)
    noise = np.repeat([0.1, 0.3, 0.6, 0.9], 8)  # 8 tokens per bin, S = 32
    selected = np.eye(bins, dtype=bool)[np.repeat(np.arange(bins), 8)]  # expert = bin
    acc.update([_record(1, selected, noise, np.zeros(32))])
    layer = acc.result()["layers"][0]
    assert layer["mi_noise_nats"] == pytest.approx(math.log(bins))
    assert layer["tokens_per_expert_by_noise"] == (np.eye(bins) * 8).tolist()
    assert layer["cv_population"] == 0.0 and layer["max_violation"] == 0.0


def test_independent_choices_give_zero_mi_and_class_tables():
    # every (noise bin, class) cell sends the same tokens to every expert pattern
    noise = np.tile(np.repeat([0.1, 0.4, 0.6, 0.8], 4), 2)  # (32,)
    labels = np.repeat([0, 1], 16)
    selected = np.eye(4, dtype=bool)[np.arange(32) % 4]  # expert = token % 4, independent
    acc = RoutingAccumulator(EDGES, capacity=1.0)
    acc.update([_record(1, selected, noise, labels)])
    layer = acc.result()["layers"][0]
    assert layer["mi_noise_nats"] == pytest.approx(0.0, abs=1e-12)
    assert layer["mi_class_nats"] == pytest.approx(0.0, abs=1e-12)
    assert layer["tokens_per_expert_by_class"] == [[4] * 4, [4] * 4]
    assert layer["capacity_by_class"] == [1.0, 1.0]


def test_one_expert_takes_all_and_capacity_by_noise():
    selected = np.zeros((8, 4), bool)
    selected[:, 0] = True  # expert 0 takes every token; tokens 0..3 also go to expert 1
    selected[:4, 1] = True
    noise = np.array([0.1] * 4 + [0.9] * 4)
    acc = RoutingAccumulator(EDGES, capacity=1.0)
    acc.update([_record(1, selected, noise, np.zeros(8))], capacities={1: 1.5})
    layer = acc.result()["layers"][0]
    assert layer["dead_fraction"] == 0.5
    assert layer["capacity_by_noise_bin"] == [2.0, None, None, 1.0]  # experts per token
    assert layer["capacity_by_noise_level"] == {"noise_level": [0.5], "capacity": [1.5]}
    assert layer["experts_per_token_hist"] == [0, 4, 4, 0, 0]
    assert layer["max_violation"] == pytest.approx(8 / 2 - 1)  # ideal = 8 * 1 / 4


def test_jaccard_between_steps_and_layers():
    a = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)
    b = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], bool)  # token 1 switches expert
    noise = np.full(4, 0.5)
    acc = RoutingAccumulator(EDGES, capacity=1.0)
    # layer 3 is layer 1 with the experts swapped: same tokens, other indices
    acc.update([_record(1, a, noise, np.zeros(4)), _record(3, a[:, ::-1], noise, np.zeros(4))],
               step=0, stream=0)
    acc.update([_record(1, b, noise, np.zeros(4)), _record(3, b[:, ::-1], noise, np.zeros(4))],
               step=1, stream=0)
    # a new stream (the next trajectory) replaces the kept masks: state does not grow
    acc.update([_record(1, b, noise, np.zeros(4)), _record(3, b[:, ::-1], noise, np.zeros(4))],
               step=0, stream=1)
    assert sorted(acc._prev) == [1, 3]
    first = acc.result()["layers"][0]
    # expert 0: {0,1} vs {0} -> 1/2; expert 1: {2,3} vs {1,2,3} -> 2/3
    assert first["adjacent_steps"]["jaccard"] == [pytest.approx((1 / 2 + 2 / 3) / 2)]
    assert first["next_layer"]["jaccard_best_match"] == 1.0
    assert first["next_layer"]["jaccard_same_index"] == 0.0
    assert first["next_layer"]["jaccard_active_tokens"] == 1.0


def test_predictor_against_training_top_k_and_entropy():
    # S = 4, E = 2: each expert's training top-K (K = 2) are the tokens with the larger score
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    prob = np.array([[0.9, 0.2], [0.3, 0.1], [0.2, 0.9], [0.6, 0.7]])
    acc = RoutingAccumulator(EDGES, capacity=1.0)
    acc.update([_record(1, scores > 0.5, np.full(4, 0.5), np.zeros(4), scores, prob)])
    layer = acc.result()["layers"][0]
    # decisions > 0.5: (0,0) tp, (3,0) fp, (1,0) fn, (2,1) tp, (3,1) tp; 3 tn
    assert layer["predictor"]["precision"] == pytest.approx(3 / 4)
    assert layer["predictor"]["recall"] == pytest.approx(3 / 4)
    entropy = -(scores * np.log(scores)).sum(axis=1).mean() / math.log(2)
    assert layer["router_entropy_norm"] == pytest.approx(entropy)
    assert layer["calibration"]["count"][9] == 2  # 0.9 twice


def _tiny_run(tmp_path, flavor="tiny-diffmoe", objective="flow", **model):
    """An exported EMA checkpoint (safetensors + JSON config), as load_for_inference reads."""
    from safetensors.torch import save_file

    from moedit.models import build_model
    from moedit.train.config import config_from_dict, config_to_dict

    cfg = config_from_dict({"model": {"flavor": flavor, "learn_sigma": objective == "ddpm", **model},
                            "diffusion": {"objective": objective}})
    torch.manual_seed(0)
    net = build_model(cfg.model)
    path = tmp_path / f"{flavor}.safetensors"
    save_file(net.state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps(config_to_dict(cfg)))
    return path


def test_probe_trajectory_matches_model_buffers_and_trace(tmp_path):
    from moedit.models.stats import reset_routing_stats, snapshot_routing_stats

    path = _tiny_run(tmp_path, depth=4)
    model, cfg = routing_probe.load_model(path, torch.device("cpu"))
    reset_routing_stats(model)
    trace = tmp_path / "trace.npz"
    options = routing_probe.ProbeOptions(noise_levels=[0.5], trajectory=True, sampling_steps=3,
                                         num_samples=6, batch_size=4, device="cpu",
                                         trace=str(trace), trace_scores=True)
    result = routing_probe.probe(path, [0.0, 1.0], options, loaded=(model, cfg))
    snapshot = snapshot_routing_stats(model)
    assert result["samples"] == 6 and result["forwards"] == 2 * 3
    assert [m["block"] for m in result["layers"]] == [1, 3]
    for ours, buffers in zip(result["layers"], snapshot["layers"]):
        # the capture records and the model's own statistic buffers saw the same forwards
        assert ours["load"] == buffers["tokens_per_expert"]
        assert ours["tokens_per_expert_by_noise"] == buffers["tokens_per_expert_by_noise"]
        assert ours["capacity_used"] == pytest.approx(buffers["capacity_used_sum"] / buffers["forwards"])
        assert len(ours["adjacent_steps"]["jaccard"]) == 2  # 3 steps -> 2 adjacent pairs
    # flow sampling runs t = 0, 1/3, 2/3: noise levels 1, 2/3, 1/3
    levels = result["layers"][0]["capacity_by_noise_level"]["noise_level"]
    assert levels == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-4)
    replay = routing_trace.analyse_trace(trace, result["noise_bin_edges"])
    for ours, again in zip(result["layers"], replay["layers"]):
        assert again["load"] == ours["load"]
        assert again["adjacent_steps"]["jaccard"] == ours["adjacent_steps"]["jaccard"]
        assert again["predictor"]["recall"] == pytest.approx(ours["predictor"]["recall"], abs=0.02)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_probe_noise_levels_on_held_out_shards(tmp_path, objective):
    from moedit.data.prepare import PrepareSpec, prepare
    from moedit.data.sources import SourceSpec

    shards = tmp_path / "shards"
    spec = PrepareSpec(source=SourceSpec(kind="synthetic", num_samples=12, num_classes=10,
                                         latent_shape=(4, 16, 16)), shard_size=12)
    prepare(spec, str(shards), workers=1, progress=False)
    path = _tiny_run(tmp_path, objective=objective)
    options = routing_probe.ProbeOptions(noise_levels=[0.25, 0.85], num_samples=10, batch_size=8,
                                         device="cpu", shards=str(shards))
    result = routing_probe.probe(path, [0.0, 1.0], options)
    layer = result["layers"][0]
    assert result["samples"] == 10
    assert layer["tokens"] == 10 * 2 * 64  # samples x levels x tokens (16/2)^2
    assert layer["capacity_by_noise_level"]["noise_level"] == pytest.approx([0.25, 0.85])
    by_noise = np.array(layer["tokens_per_expert_by_noise"])  # model edges: 10 bins of 0.1
    assert by_noise.sum(axis=1).nonzero()[0].tolist() == [2, 8]


@pytest.mark.parametrize("batching,calls_per_step", [("joint", 1), ("separate", 2)])
def test_guided_trajectory_records_its_guidance_batching(tmp_path, batching, calls_per_step):
    """A DiffMoE pool differs between one 2B call and two B calls: the report says which ran."""
    path = _tiny_run(tmp_path)
    model, cfg = routing_probe.load_model(path, torch.device("cpu"))
    cfg.diffusion.cfg_batching = batching
    options = routing_probe.ProbeOptions(noise_levels=[0.5], trajectory=True, sampling_steps=2, num_samples=3,
                                         batch_size=3, device="cpu", cfg_scale=2.0)
    result = routing_probe.probe(path, [0.0, 1.0], options, loaded=(model, cfg))
    assert (result["cfg_batching"], result["cfg_scale"], result["batch_size"]) == (batching, 2.0, 3)
    assert result["forwards"] == 2 * calls_per_step
    assert result["layers"][0]["tokens"] == 2 * 2 * 3 * 64  # steps x (cond + null) x images x tokens


def test_dense_checkpoint_is_a_clear_error(tmp_path):
    path = _tiny_run(tmp_path, flavor="tiny-dense")
    options = routing_probe.ProbeOptions(noise_levels=[0.5], trajectory=True, sampling_steps=1,
                                         num_samples=1, device="cpu")
    with pytest.raises(MoeditError, match="dense model"):
        routing_probe.probe(path, [0.0, 1.0], options)


def _write_small_trace(path):
    writer = routing_trace.TraceWriter()
    selected = np.eye(3, dtype=bool)[[0, 1, 2, 0, 1, 2]]  # (6, 3)
    writer.add([_record(1, selected, np.full(6, 0.3), np.arange(6))], {1: 1.0}, None, 0)
    return writer.save(path)


def test_trace_round_trip_and_corrupt_traces(tmp_path):
    path = _write_small_trace(tmp_path / "t.npz")
    layer = routing_trace.analyse_trace(path, EDGES)["layers"][0]
    assert layer["load"] == [2, 2, 2] and layer["capacity_used"] == 1.0
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:100])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    data = dict(np.load(path))
    data["selected_0"] = data["selected_0"][:3]
    short = tmp_path / "short.npz"
    np.savez(short, **data)
    for bad, reason in [(truncated, "corrupt"), (garbage, "corrupt"), (short, "selected_0")]:
        with pytest.raises(MoeditError, match=reason) as info:
            routing_trace.analyse_trace(bad, EDGES)
        assert "\n" not in str(info.value)
