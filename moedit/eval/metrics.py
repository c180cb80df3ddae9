"""Streaming feature statistics and the metrics computed from them.

`FeatureStats` keeps only sums, so memory does not grow with the number of images and two
statistics add (over chunks, over ranks: an all-reduce SUM):

- per feature vector (`pool`, `spatial`): count, sum x and sum x x^T in float64;
- for the Inception Score, per split of `split_size` consecutive *global* sample indices:
  count, sum p(y|x) and sum_x sum_y p log p (so splits do not depend on how ranks share images);
- for precision/recall, which need the features themselves: the `pool` vectors of the samples
  with global index < `keep` (a bounded subsample, the same whichever rank made them).

Metrics: Frechet distance (FID on pool, sFID on spatial), Inception Score (mean over splits,
as ADM's evaluator), and improved precision/recall (Kynkaenniemi et al. 2019, k = 3 as ADM).
"""

from __future__ import annotations

import math

import numpy as np
import torch

FEATURE_SUMS = ("pool", "spatial")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), which stays real and exact for
    singular covariances (fewer images than dimensions), where scipy's sqrtm route needs an
    epsilon offset.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Frechet distance of statistics with different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (were they made by the same feature network?)")
    eigvals, eigvecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T  # S1^(1/2)
    middle = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def mean_cov(count: float, total: torch.Tensor, outer: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) from count, sum x and sum x x^T."""
    if count < 2:
        raise ValueError(f"statistics of {int(count)} image(s): a covariance needs at least 2")
    mu = total.double().cpu().numpy() / count
    cov = (outer.double().cpu().numpy() - count * np.outer(mu, mu)) / (count - 1)
    return mu, cov


class FeatureStats:
    """Sums of features over images; see the module docstring. All state is `self.tensors`."""

    def __init__(self, dims: dict[str, int], *, num_samples: int, keep: int, split_size: int = 5000,
                 device: torch.device | str = "cpu"):
        if split_size < 1:
            raise ValueError(f"Inception Score split size {split_size}: must be >= 1")
        self.dims, self.keep, self.split_size = dict(dims), min(int(keep), int(num_samples)), int(split_size)
        f64 = dict(dtype=torch.float64, device=device)
        t: dict[str, torch.Tensor] = {}
        for key in FEATURE_SUMS:
            if key in dims:
                t[f"{key}_count"] = torch.zeros((), **f64)
                t[f"{key}_sum"] = torch.zeros(dims[key], **f64)
                t[f"{key}_outer"] = torch.zeros(dims[key], dims[key], **f64)
        if "logits" in dims:
            splits = max(1, math.ceil(num_samples / self.split_size))
            t["is_count"] = torch.zeros(splits, **f64)
            t["is_sum_p"] = torch.zeros(splits, dims["logits"], **f64)
            t["is_sum_plogp"] = torch.zeros(splits, **f64)
        t["kept"] = torch.zeros(self.keep, dims["pool"], dtype=torch.float32, device=device)
        t["kept_mask"] = torch.zeros(self.keep, dtype=torch.float32, device=device)
        self.tensors = t

    @torch.no_grad()
    def update(self, features: dict[str, torch.Tensor], indices: torch.Tensor) -> None:
        """Add a batch: `features[key]` (B, dims[key]); `indices` (B,) the images' global indices."""
        t = self.tensors
        device = t["kept"].device
        indices = indices.to(device)
        for key in FEATURE_SUMS:
            if key in self.dims:
                x = features[key].to(device, torch.float64)  # (B, D)
                t[f"{key}_count"] += x.shape[0]
                t[f"{key}_sum"] += x.sum(dim=0)
                t[f"{key}_outer"] += x.T @ x  # (D, D)
        if "logits" in self.dims:
            log_p = torch.log_softmax(features["logits"].to(device, torch.float64), dim=1)  # (B, K)
            p = log_p.exp()
            split = indices // self.split_size
            t["is_count"].index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
            t["is_sum_p"].index_add_(0, split, p)
            t["is_sum_plogp"].index_add_(0, split, (p * log_p).sum(dim=1))
        kept = indices < self.keep
        if kept.any():
            rows = indices[kept]
            t["kept"][rows] = features["pool"].to(device, torch.float32)[kept]
            t["kept_mask"][rows] = 1.0

    @property
    def count(self) -> int:
        return int(self.tensors["pool_count"].item())

    def add_(self, other: "FeatureStats") -> None:
        for key, value in self.tensors.items():
            value += other.tensors[key].to(value.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.cpu() for key, value in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.tensors):
            raise ValueError(f"saved statistics hold {sorted(state)}, expected {sorted(self.tensors)}")
        for key, value in self.tensors.items():
            if state[key].shape != value.shape:
                raise ValueError(f"saved statistics {key}: shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(value.shape)}")
            value.copy_(state[key])

    def moments(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(mu, sigma) of `pool` or `spatial`, or None if the extractor has no such feature."""
        if f"{key}_count" not in self.tensors:
            return None
        t = self.tensors
        return mean_cov(t[f"{key}_count"].item(), t[f"{key}_sum"], t[f"{key}_outer"])

    def kept_features(self) -> torch.Tensor:
        """(M, D) the pool features of the subsample (rows not filled are dropped)."""
        mask = self.tensors["kept_mask"] > 0
        return self.tensors["kept"][mask]

    def inception_score(self) -> tuple[float, float] | None:
        """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), or None without logits."""
        if "is_count" not in self.tensors:
            return None
        t = self.tensors
        scores = []
        for n, sum_p, sum_plogp in zip(t["is_count"].tolist(), t["is_sum_p"].cpu(), t["is_sum_plogp"].tolist()):
            if n == 0:
                continue
            marginal = sum_p / n  # p(y) over the split
            # E_x KL = E_x sum_y p log p - sum_y p(y) log p(y)
            kl = sum_plogp / n - torch.special.xlogy(marginal, marginal).sum().item()
            scores.append(math.exp(kl))
        return float(np.mean(scores)), float(np.std(scores))


def knn_radii(features: torch.Tensor, k: int, row_batch: int = 1024) -> torch.Tensor:
    """(M,) distance from each row to its k-th nearest other row (the manifold ball radius)."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images, got {features.shape[0]}")
    radii = []
    for start in range(0, features.shape[0], row_batch):
        dist = torch.cdist(features[start:start + row_batch], features)  # (b, M), self at distance 0
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor,
                      row_batch: int = 1024) -> float:
    """Fraction of `points` inside at least one ball (center_i, radius_i)."""
    inside = []
    for start in range(0, points.shape[0], row_batch):
        dist = torch.cdist(points[start:start + row_batch], centers)  # (b, M)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real, fake = real.double(), fake.double()
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


class Reference:
    """Reference statistics: (mu, sigma) per feature vector, and pool features for precision/recall."""

    def __init__(self, moments: dict[str, tuple[np.ndarray, np.ndarray]], kept: torch.Tensor | None,
                 count: int, info: dict):
        self.moments, self.kept, self.count, self.info = moments, kept, count, info

    @classmethod
    def from_stats(cls, stats: FeatureStats, info: dict) -> "Reference":
        moments = {key: stats.moments(key) for key in FEATURE_SUMS if stats.moments(key) is not None}
        return cls(moments, stats.kept_features().cpu(), stats.count, info)

    def to_npz(self) -> dict[str, np.ndarray]:
        """ADM reference-batch keys (mu, sigma, mu_s, sigma_s) plus the kept pool features."""
        arrays = {"count": np.array(self.count)}
        for key, suffix in (("pool", ""), ("spatial", "_s")):
            if key in self.moments:
                arrays[f"mu{suffix}"], arrays[f"sigma{suffix}"] = self.moments[key]
        if self.kept is not None:
            arrays["pool_features"] = self.kept.numpy()
        return arrays


def compare(samples: FeatureStats, reference: Reference, k: int = 3) -> dict[str, float | None]:
    """FID, sFID, Inception Score (mean, std over splits), precision and recall; None where a
    side lacks what the metric needs."""
    result: dict[str, float | None] = {}
    for key, name in (("pool", "fid"), ("spatial", "sfid")):
        ours = samples.moments(key)
        theirs = reference.moments.get(key)
        result[name] = None if ours is None or theirs is None else frechet_distance(*ours, *theirs)
    score = samples.inception_score()
    result["inception_score"], result["inception_score_std"] = score if score else (None, None)
    fake = samples.kept_features()
    if reference.kept is not None and len(reference.kept) > k and len(fake) > k:
        result["precision"], result["recall"] = precision_recall(reference.kept.to(fake.device), fake, k)
    else:
        result["precision"] = result["recall"] = None
    return result
