"""Evaluation metrics: Frechet distance against closed forms and scipy's sqrtm route, streaming
statistics against whole-set numpy, Inception Score and precision/recall against brute force."""

import numpy as np
import pytest
import scipy.linalg
import torch

from moedit.eval.metrics import FeatureStats, Reference, compare, frechet_distance, precision_recall

DIMS = {"pool": 6, "spatial": 5, "logits": 4}


def random_spd(rng, dim, scale=1.0):
    a = rng.normal(size=(dim, dim))
    return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


def sqrtm_route(mu1, s1, mu2, s2):
    """The classic route (pytorch-fid / ADM): scipy.linalg.sqrtm of S1 S2, real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def stats_of(features: dict, num_samples=None, keep=0, batch=None, split_size=5000):
    n = len(features["pool"])
    stats = FeatureStats({k: v.shape[1] for k, v in features.items()}, num_samples=num_samples or n, keep=keep,
                         split_size=split_size)
    batch = batch or n
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        stats.update({k: v[start:stop] for k, v in features.items()}, torch.arange(start, stop))
    return stats


def random_features(seed, n=300, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(n, dim, generator=gen, dtype=torch.float64) * (1 + 0.3 * torch.arange(dim)) + shift
            for key, dim in DIMS.items()}


def test_frechet_matches_closed_form_for_covariances_sharing_eigenvectors():
    rng = np.random.default_rng(0)
    dim = 8
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    # Commuting covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    # 1-D: (mu1 - mu2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_matches_scipy_sqrtm_route_for_general_covariances():
    rng = np.random.default_rng(1)
    for dim in (3, 16, 64):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = random_spd(rng, dim), random_spd(rng, dim, scale=2.0)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_route(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_rejects_statistics_of_different_sizes():
    with pytest.raises(ValueError, match="same feature network"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_moments_equal_whole_set_numpy_and_fid_of_a_set_with_itself_is_zero():
    features = random_features(0)
    stats = stats_of(features, batch=17)
    for key in ("pool", "spatial"):
        mu, sigma = stats.moments(key)
        x = features[key].numpy()
        np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    reference = Reference.from_stats(stats, {})
    result = compare(stats, reference)
    assert abs(result["fid"]) < 1e-9 and abs(result["sfid"]) < 1e-9
    assert result["precision"] is None  # keep = 0: no subsample, so no precision/recall


def test_known_mean_shift_gives_its_squared_norm():
    base = random_features(1)
    delta = {key: torch.linspace(-1, 2, dim, dtype=torch.float64) for key, dim in DIMS.items()}
    shifted = {key: value + delta[key] for key, value in base.items()}
    result = compare(stats_of(shifted), Reference.from_stats(stats_of(base), {}))
    # Same covariance, so FID = |delta|^2 exactly (up to rounding).
    assert result["fid"] == pytest.approx(float(delta["pool"] @ delta["pool"]), rel=1e-9)
    assert result["sfid"] == pytest.approx(float(delta["spatial"] @ delta["spatial"]), rel=1e-9)


def test_statistics_do_not_depend_on_batch_size_or_order_and_add_over_parts():
    features = random_features(2, n=90)
    whole = stats_of(features, keep=40, split_size=25)
    for batch in (1, 7, 64):
        other = stats_of(features, keep=40, batch=batch, split_size=25)
        for key, value in whole.tensors.items():
            torch.testing.assert_close(other.tensors[key], value, rtol=1e-12, atol=1e-9)
    # Two disjoint halves, as two ranks would hold them, summed = the whole.
    parts = []
    for half in (torch.arange(0, 90, 2), torch.arange(1, 90, 2)):
        part = FeatureStats(DIMS, num_samples=90, keep=40, split_size=25)
        part.update({k: v[half] for k, v in features.items()}, half)
        parts.append(part)
    parts[0].add_(parts[1])
    for key, value in whole.tensors.items():
        torch.testing.assert_close(parts[0].tensors[key], value, rtol=1e-12, atol=1e-9)
    assert parts[0].count == 90
    torch.testing.assert_close(parts[0].kept_features(), features["pool"][:40].float())


def test_inception_score_matches_the_per_split_formula():
    features = random_features(3, n=25)
    features["logits"] = features["logits"] * 3
    stats = stats_of(features, batch=4, split_size=10)
    p = torch.softmax(features["logits"], dim=1).numpy()
    scores = []
    for lo, hi in ((0, 10), (10, 20), (20, 25)):  # ADM: consecutive splits, the last may be short
        part = p[lo:hi]
        kl = (part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    mean, std = stats.inception_score()
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    # Confident, evenly spread predictions: IS = number of classes.
    onehot = {"pool": torch.zeros(8, 2), "logits": torch.eye(4).repeat(2, 1) * 200}
    assert stats_of(onehot).inception_score()[0] == pytest.approx(4.0, rel=1e-6)


def brute_force_pr(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    def coverage(points, centers, r):
        d = np.linalg.norm(points[:, None] - centers[None], axis=2)
        return float(np.mean([(row <= r).any() for row in d]))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_match_brute_force_and_extremes():
    gen = torch.Generator().manual_seed(4)
    real = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    fake = torch.randn(50, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    expected = brute_force_pr(real.numpy(), fake.numpy(), 3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that separates the two metrics
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="needs more than 3 images"):
        precision_recall(real[:3], fake, k=3)


def test_saved_statistics_must_match_the_network():
    stats = FeatureStats(DIMS, num_samples=10, keep=5)
    other = FeatureStats({"pool": 7, "logits": 4}, num_samples=10, keep=5)
    with pytest.raises(ValueError, match="saved statistics"):
        stats.load_state_dict(other.state_dict())
