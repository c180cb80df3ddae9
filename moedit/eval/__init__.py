"""Evaluation: FID, sFID, Inception Score and precision/recall of a checkpoint's samples.

    moedit evaluate RUN --num-samples 50000 --ref REF.npz --inception-weights PATH

- `features`: the feature networks (pytorch-fid's Inception-v3 from a local file; a tiny random
  network for tests) behind one interface and the `FEATURES` registry;
- `metrics`: streaming sums (`FeatureStats`), Frechet distance, Inception Score, precision/recall;
- `reference`: reference statistics from an ADM .npz or a shard set, cached;
- `sampling`: distributed, resumable sampling in chunks straight into statistics;
- `cli`: the command. See docs/evaluation.md.
"""

from moedit.lazy import lazy_attributes

# Loaded on first use, so that the command modules (`moedit evaluate --help`) need no torch.
_LAZY = {**{name: "moedit.eval.features" for name in ("FEATURES", "FeatureExtractor", "build_features")},
         **{name: "moedit.eval.metrics" for name in ("FeatureStats", "Reference", "compare", "frechet_distance",
                                                      "precision_recall")}}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["FEATURES", "FeatureExtractor", "FeatureStats", "Reference", "build_features", "compare",
           "frechet_distance", "precision_recall"]
