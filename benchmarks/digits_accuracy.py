"""Conditional accuracy of a run trained on the built-in digits: does it draw the digit it is asked for?

    python benchmarks/digits_accuracy.py RUN [--per-digit 60] [--seed 0] [--json out.json] [-- SAMPLE_ARGS ...]

Samples come from `moedit sample` itself (its --save-npz output): a class-conditional run is asked
for each class, a text run for each digit in every phrasing the captions of `data.prepare:
digits_text` use ("a handwritten 7", "the digit seven", ...), --per-digit images per digit spread
evenly over the phrasings. A classifier trained on the 1,797 real 8x8 digits (scikit-learn's
logistic regression on the 0..16 pixel values; its 5-fold cross-validated accuracy on the real
digits is printed as the ceiling) names the digit of each sample. The table gives, per digit, the
share of its samples classified as that digit; chance is 10%. Arguments after `--` go to
`moedit sample` (e.g. `-- --cfg-scale 3 --steps 50`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml


def classifier():
    """(logistic regression fitted on all real digits, its 5-fold cross-validated accuracy)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    digits = load_digits()
    model = LogisticRegression(max_iter=5000)
    ceiling = float(cross_val_score(model, digits.data, digits.target, cv=5).mean())
    return model.fit(digits.data, digits.target), ceiling


def sample(run: Path, per_digit: int, seed: int, extra: list[str], work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 64) on the real digits' 0..16 scale, the digit each was asked for (N,))."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    text = cfg["model"].get("condition", "class") == "text"
    npz = work / "samples.npz"
    command = [sys.executable, "-m", "moedit.cli", "sample", str(run), "--seed", str(seed),
               "--out", str(work / "samples.png"), "--save-npz", str(npz)]
    if text:
        from moedit.data.text import digit_captions

        phrasings = [digit_captions(d) for d in range(10)]
        prompts = [p for d in range(10) for p in phrasings[d]]
        digit_of_prompt = np.array([d for d in range(10) for _ in phrasings[d]])
        per_prompt = -(-per_digit // len(phrasings[0]))
        (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
        command += ["--prompts-file", str(work / "prompts.txt"), "--per-prompt", str(per_prompt)]
    else:
        command += ["--classes", ",".join(map(str, range(10))), "--num-samples", str(10 * per_digit)]
    subprocess.run(command + extra, check=True)
    data = np.load(npz)
    images = data["images"].reshape(len(data["images"]), -1) * 16.0  # [0, 1] -> the real digits' 0..16
    asked = digit_of_prompt[data["prompt_index"]] if text else data["labels"]
    return images, asked


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory trained on the built-in digits")
    parser.add_argument("--per-digit", type=int, default=60, help="samples per digit (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    model, ceiling = classifier()
    with tempfile.TemporaryDirectory() as tmp:
        images, asked = sample(args.run, args.per_digit, args.seed, extra, Path(tmp))
    predicted = model.predict(images)
    rows = []
    print(f"{'digit':>5}  {'samples':>7}  {'accuracy':>8}  most often drawn instead")
    for d in range(10):
        mine = predicted[asked == d]
        wrong = np.bincount(mine[mine != d], minlength=10)
        accuracy = float((mine == d).mean())
        rows.append({"digit": d, "samples": int(len(mine)), "accuracy": accuracy})
        instead = f"{int(wrong.argmax())} ({int(wrong.max())})" if wrong.any() else "-"
        print(f"{d:>5}  {len(mine):>7}  {accuracy:>8.1%}  {instead}")
    overall = float((predicted == asked).mean())
    print(f"{'all':>5}  {len(asked):>7}  {overall:>8.1%}  (chance 10.0%; the classifier on real digits, "
          f"5-fold: {ceiling:.1%})")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "overall": overall, "classifier_cv": ceiling,
                                         "per_digit": rows, "sample_args": extra, "seed": args.seed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
