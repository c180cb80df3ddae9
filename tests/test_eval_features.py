"""Feature networks and reference statistics: local-only Inception weights, the test network,
ADM .npz reference batches (streamed, stored moments used when they fit) and the cache."""

import numpy as np
import pytest
import torch

from moedit.engines.base import DistEnv, Engine
from moedit.errors import MoeditError
from moedit.eval.features import INCEPTION_WEIGHTS_FILE, RandomTestFeatures, build_features, to_network_input
from moedit.eval.metrics import FeatureStats
from moedit.eval.reference import ReferenceSource, build_reference, iter_npz_images


def test_missing_inception_weights_name_the_file_and_how_to_pass_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEDIT_INCEPTION_WEIGHTS", raising=False)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(MoeditError) as info:
        build_features("inception", str(missing))
    message = str(info.value)
    assert str(missing) in message and INCEPTION_WEIGHTS_FILE in message and "--inception-weights" in message
    with pytest.raises(MoeditError, match="not given"):
        build_features("inception", None)
    with pytest.raises(ValueError, match="unknown feature network"):
        build_features("vgg", None)


def test_not_the_fid_weights_is_a_clear_error(tmp_path):
    pytest.importorskip("pytorch_fid")
    bogus = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bogus)
    with pytest.raises(MoeditError, match="fc.weight|pytorch-fid"):
        build_features("inception", str(bogus))


def test_network_input_is_quantised_to_8_bits_and_rgb():
    images = torch.tensor([0.0, 0.5, 1.0, 1.3, 0.1234]).view(1, 1, 1, 5)
    out = to_network_input(images)
    assert out.shape == (1, 3, 1, 5)
    torch.testing.assert_close(out[0, 2, 0], torch.tensor([0.0, 128 / 255, 1.0, 1.0, 31 / 255]))
    with pytest.raises(ValueError, match="expected"):
        to_network_input(torch.zeros(2, 4, 8, 8))


def test_random_test_network_is_the_same_whatever_the_global_rng():
    torch.manual_seed(1)
    first = RandomTestFeatures()
    torch.manual_seed(2)
    second = RandomTestFeatures()
    images = torch.rand(3, 3, 8, 8)
    for key, value in first(images).items():
        assert value.shape == (3, first.dims[key])
        torch.testing.assert_close(second(images)[key], value, rtol=0, atol=0)


def _adm_npz(path, images, **moments):
    np.savez(path, arr_0=images, **moments)
    return path


def test_adm_reference_batch_is_streamed_and_its_fitting_moments_are_used(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 8, 8, 3), dtype=np.uint8)
    streamed = torch.cat([batch for batch, _ in iter_npz_images(_adm_npz(tmp_path / "a.npz", images), 5, 100)])
    torch.testing.assert_close(streamed, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)

    net = RandomTestFeatures()
    engine = Engine(DistEnv(), torch.device("cpu"))
    stored_mu, stored_sigma = np.arange(16.0), np.eye(16) * 2
    npz = _adm_npz(tmp_path / "ref.npz", images, mu=stored_mu, sigma=stored_sigma,
                   mu_s=np.zeros(2048), sigma_s=np.eye(2048))  # mu_s of another network's size: recomputed
    source = ReferenceSource(str(npz), None, num_samples=30)
    reference = build_reference(source, net, engine, cache_dir=tmp_path / "cache", keep=12, batch_size=8,
                                progress=False)
    assert reference.count == 30 and not reference.info["from_cache"]
    np.testing.assert_array_equal(reference.moments["pool"][0], stored_mu)
    # Spatial moments and the kept features come from the first 30 images through the network.
    direct = FeatureStats(net.dims, num_samples=30, keep=12)
    direct.update(net(to_network_input(streamed[:30])), torch.arange(30))
    np.testing.assert_allclose(reference.moments["spatial"][0], direct.moments("spatial")[0], rtol=1e-10)
    np.testing.assert_allclose(reference.moments["spatial"][1], direct.moments("spatial")[1], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(reference.kept, direct.kept_features())

    again = build_reference(source, net, engine, cache_dir=tmp_path / "cache", keep=12, batch_size=3, progress=False)
    assert again.info["from_cache"]
    np.testing.assert_array_equal(again.moments["spatial"][1], reference.moments["spatial"][1])
    np.testing.assert_array_equal(again.moments["pool"][0], stored_mu)


def test_reference_without_images_or_fitting_moments_is_rejected(tmp_path):
    npz = tmp_path / "stats_only.npz"
    np.savez(npz, mu=np.zeros(2048), sigma=np.eye(2048))
    source = ReferenceSource(str(npz), None, num_samples=10)
    engine = Engine(DistEnv(), torch.device("cpu"))
    with pytest.raises(MoeditError, match="no images"):
        build_reference(source, RandomTestFeatures(), engine, cache_dir=tmp_path, keep=0, batch_size=4, progress=False)
    with pytest.raises(MoeditError, match="file not found"):
        ReferenceSource(str(tmp_path / "missing.npz"), None, num_samples=10)


def _pytorch_fid_or_skip():
    try:
        from pytorch_fid import inception
    except Exception as exc:  # torchvision built for another torch raises RuntimeError, not ImportError
        pytest.skip(f"pytorch-fid not usable here: {type(exc).__name__}: {exc}")
    return inception


def test_inception_features_are_pytorch_fids_network_from_a_local_file(tmp_path, monkeypatch):
    fid_inception = _pytorch_fid_or_skip()
    import torchvision

    # A randomly initialised FID Inception saved locally stands in for the real weights file.
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    net = fid_inception.fid_inception_v3()
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), weights)
    monkeypatch.undo()
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))

    extractor = build_features("inception", str(weights))
    images = torch.rand(2, 3, 64, 64)
    out = extractor(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
    # pool_3 is pytorch-fid's own output; logits use the softmax weights without bias.
    state = torch.load(weights, weights_only=True)
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference_net = fid_inception.InceptionV3([3]).eval()
    torch.testing.assert_close(out["pool"], reference_net(images)[0].flatten(1))
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)
