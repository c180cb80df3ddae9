"""moedit upcycle: the exact condition under which the upcycled model equals the dense one at
initialisation, the documented initialisation, noise, and bad targets."""

import pytest
import torch

from moedit import cli
from moedit.errors import MoeditError
from moedit.interop.convert import build_config, write_checkpoint
from moedit.interop.upcycle import upcycle_checkpoint
from moedit.models import build_model
from moedit.train.checkpoint import load_for_inference


def dense_checkpoint(path, fields=(), seed=0):
    """A dense tiny checkpoint with every tensor random, so attention, FFN and adaLN gates all matter."""
    cfg = build_config("tiny-dense", None, list(fields), "ddpm")
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name != "pos_embed":
                tensor.normal_(0, 0.15)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    write_checkpoint(path, cfg, state, state, {"test": True})
    return path


def _outputs(path, mode):
    model, _ = load_for_inference(path)
    model.train(mode == "train")
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([5.0, 300.0, 620.0, 990.0]), torch.tensor([0, 2, 7, 10])
    torch.manual_seed(11)  # the same label dropout for both models in training mode
    with torch.no_grad():
        return model(x, t, y)


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


# (dense fields, target flavor, overrides, mode, equal): equal exactly when every token's combine
# weights sum to one (docs/interop.md, moedit/interop/upcycle.py).
CASES = [
    ((), "tiny-diffmoe", [], "eval", True),  # dynamic inference, thresholds 0: every expert takes every token
    ((), "tiny-diffmoe", ["moe.capacity=4"], "train", True),  # capacity C = E
    ((), "tiny-diffmoe", [], "train", False),  # C = 1: a token's weights sum to < 1
    ((), "tiny-diffmoe", ["moe.inference_mode=static", "moe.inference_capacity=4"], "eval", True),
    ((), "tiny-ec", ["moe.capacity=4"], "eval", True),
    ((), "tiny-ec", [], "eval", False),
    ((), "tiny-tc", ["moe.renormalize=true"], "eval", True),
    ((), "tiny-tc", [], "eval", False),  # top-1 softmax weight < 1
    (("model.ffn_type=swiglu",), "tiny-ditmoe", ["moe.renormalize=true"], "eval", True),  # + zero shared expert
    (("model.ffn_type=swiglu",), "tiny-ditmoe", [], "eval", False),  # DiT-MoE: p1 + p2 < 1
]


@pytest.mark.parametrize("fields, flavor, overrides, mode, equal", CASES)
def test_upcycled_equals_dense_exactly_when_combine_weights_sum_to_one(tmp_path, fields, flavor, overrides, mode,
                                                                       equal):
    dense = dense_checkpoint(tmp_path / "dense", fields)
    upcycle_checkpoint(dense, tmp_path / "moe", flavor=flavor, overrides=overrides)
    gap = _relative(_outputs(tmp_path / "moe", mode), _outputs(dense, mode))
    assert gap <= 1e-5 if equal else gap > 1e-3


def test_initialisation_is_the_documented_one(tmp_path, monkeypatch):
    dense = dense_checkpoint(tmp_path / "dense", ["model.ffn_type=swiglu"])
    monkeypatch.setitem(cli.COMMANDS, "upcycle", ("moedit.interop.upcycle_cli", "upcycle"))
    assert cli.main(["upcycle", str(dense), "--flavor", "tiny-ditmoe", "--out", str(tmp_path / "a"),
                     "--noise-std", "0.1", "--seed", "1"]) == 0
    upcycle_checkpoint(dense, tmp_path / "b", flavor="tiny-ditmoe", noise_std=0.1, seed=1)
    upcycle_checkpoint(dense, tmp_path / "c", flavor="tiny-ditmoe", noise_std=0.1, seed=2)
    dense_state = load_for_inference(dense)[0].state_dict()
    a, b, c = (load_for_inference(tmp_path / n)[0].state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic in the seed
    assert not torch.equal(a["blocks.0.mlp.router.gate.weight"], c["blocks.0.mlp.router.gate.weight"])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        W = dense_state[f"blocks.1.mlp.{proj}.weight"]
        experts = a[f"blocks.1.mlp.experts.{proj}_weight"]  # (E, out, in)
        noise = experts - W
        assert noise.std().item() == pytest.approx(0.1 * W.std().item(), rel=0.05)
        assert not torch.equal(noise[0], noise[1])  # independent per expert
    assert torch.count_nonzero(a["blocks.1.mlp.shared_experts.down_proj.weight"]) == 0  # shared adds 0
    diffmoe = upcycle_checkpoint(dense_checkpoint(tmp_path / "d2"), tmp_path / "e", flavor="tiny-diffmoe")
    state = load_for_inference(diffmoe)[0].state_dict()
    assert torch.count_nonzero(state["blocks.1.mlp.router.expert_threshold"]) == 0
    assert state["blocks.1.mlp.router.gate.weight"].std().item() == pytest.approx(0.006, rel=0.1)
    assert torch.equal(state["blocks.1.mlp.experts.fc1_bias"][3], load_for_inference(tmp_path / "d2")[0]
                       .state_dict()["blocks.1.mlp.fc1.bias"])


def test_bad_targets_are_named(tmp_path):
    dense = dense_checkpoint(tmp_path / "dense")
    with pytest.raises(MoeditError, match="hidden_size: dense 32, target 384"):
        upcycle_checkpoint(dense, tmp_path / "a", flavor="DiffMoE-S-E16")
    with pytest.raises(MoeditError, match="pass an MoE --flavor or moe"):
        upcycle_checkpoint(dense, tmp_path / "b")
    with pytest.raises(MoeditError, match="granularity"):
        upcycle_checkpoint(dense, tmp_path / "c", flavor="tiny-diffmoe", overrides=["moe.granularity=2"])
    moe = upcycle_checkpoint(dense, tmp_path / "d", overrides=["moe.router=diffmoe", "moe.num_experts=2"])
    with pytest.raises(MoeditError, match="already has MoE layers"):
        upcycle_checkpoint(moe, tmp_path / "e", flavor="tiny-diffmoe")
