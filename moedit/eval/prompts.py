"""Prompts for sampling and evaluating text-to-image runs.

`read_prompts` gathers `--prompt` and `--prompts-file` (one prompt a line; blank lines and lines
starting with # are skipped); `run_text_encoder` finds the run's text encoder (the data
manifest's `text_encoder` entry, or `--text-encoder DIR`) and `encode_prompts` turns the prompts
into `Captions`. `PromptLoad` splits the expert load of sampling by prompt (tokens per expert
for each prompt index, plus a last row for the null caption of guidance's unconditional
forwards), next to the class models' `tokens_per_expert_by_class`. `save_captioned_grid` writes
one row per prompt with the prompt printed above it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moedit.errors import MoeditError
from moedit.eval.sampling import Captions


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of a file: one a line, blank lines and lines starting with # skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MoeditError(f"--prompts-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoeditError(f"--prompts-file {path}: cannot read it ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise MoeditError(f"--prompts-file {path}: no prompts (one a line; blank lines and # comments are skipped)")
    return prompts


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """`--prompt` values followed by the prompts of `--prompts-file`; [] when neither is given."""
    out = [p.strip() for p in prompts or []]
    if any(not p for p in out):
        raise MoeditError("--prompt: an empty prompt; give the caption text, e.g. --prompt 'a handwritten 7'")
    if prompts_file:
        out += read_prompts_file(prompts_file)
    return out


def check_condition(cfg_model, prompts: list[str], classes: str | None) -> None:
    """Prompts are for text runs, classes for class runs: a named error for the wrong one."""
    if cfg_model.is_text:
        if classes:
            raise MoeditError(f"--classes {classes}: this run is a text-to-image model (model.condition = text); "
                              "give captions with --prompt TEXT or --prompts-file FILE")
        if not prompts:
            raise MoeditError("this run is a text-to-image model (model.condition = text): "
                              "give captions with --prompt TEXT or --prompts-file FILE")
    elif prompts:
        raise MoeditError(f"--prompt/--prompts-file: this run is conditioned on {cfg_model.condition} labels "
                          "(model.condition = class), not captions; use --classes")


def run_text_encoder(cfg, override: str | None) -> dict:
    """{"path", "max_length", "source"} of the encoder a text run conditions on: `--text-encoder`
    over the data manifest's `text_encoder` entry (one without a path, type unknown, needs
    `--text-encoder`); max_length is the model's text_len."""
    from moedit.data import load_manifest
    from moedit.data.manifest import manifest_path
    from moedit.data.text import read_encoder_config

    where = manifest_path(cfg.data)
    entry = None
    try:
        entry = load_manifest(where).text_encoder
    except (MoeditError, FileNotFoundError, OSError):
        if not override:
            raise MoeditError(f"no dataset manifest at {where} to name the run's text encoder: "
                              "pass --text-encoder DIR (the encoder the run trained on)") from None
    if entry and int(entry["max_length"]) != cfg.model.text_len:
        raise MoeditError(f"{where}: text_encoder max_length {entry['max_length']} differs from the model's "
                          f"text_len {cfg.model.text_len}")
    if override:
        path, source = str(override), "--text-encoder"
    elif entry and entry["path"] is None:
        raise MoeditError(f"{where} records a text_encoder of type {entry['type']} with no path (shards indexed with "
                          "`moedit prepare --source shards` cannot name their encoder): pass --text-encoder DIR, the "
                          "encoder that made the shards' text features")
    elif entry:
        path, source = str(entry["path"]), str(where)
    else:
        raise MoeditError(f"{where} records no text_encoder: pass --text-encoder DIR (the encoder the run trained on)")
    if not Path(path).is_dir():
        raise MoeditError(f"text encoder {path} (from {source}) not found: pass --text-encoder DIR, the local "
                          "encoder directory the run trained on")
    _, width, _ = read_encoder_config(path)
    if width != cfg.model.text_dim:
        raise MoeditError(f"text encoder {path} (from {source}) gives {width}-wide features but the model takes "
                          f"model.text_dim = {cfg.model.text_dim}: pass --text-encoder DIR, the encoder the run "
                          "trained on")
    return {"path": str(Path(path).resolve()), "max_length": cfg.model.text_len, "source": source}


def encode_prompts(encoder: dict, prompts: list[str]) -> Captions:
    """The prompts encoded as the shards store captions (float16 features, bool mask)."""
    from moedit.data.text import encode_captions

    text, mask = encode_captions(encoder["path"], prompts, max_length=encoder["max_length"])
    return Captions(text.half(), mask)  # the shards hold float16: condition on the same numbers


class PromptLoad:
    """Tokens per expert for each prompt index (P rows) plus the null caption (row P), per MoE
    layer, from the per-token routing `moedit.models.stats.capture_routing` records."""

    def __init__(self, num_prompts: int):
        self.num_prompts = num_prompts
        self.tables: dict[int, np.ndarray] = {}  # block -> (P + 1, E) int64

    def add(self, records: list[dict], groups: torch.Tensor) -> None:
        """`records` of one model call on B rows; `groups` (B,) each row's prompt index (P = null)."""
        for record in records:
            selected = record["selected"]  # (S, E) bool, S = B * T
            batch = groups.shape[0]
            per_row = selected.view(batch, -1, selected.shape[1]).sum(dim=1)  # (B, E)
            table = torch.zeros(self.num_prompts + 1, selected.shape[1], dtype=torch.long)
            table.index_add_(0, groups.cpu().long(), per_row.long())
            block = int(record["block"])
            self.tables[block] = self.tables.get(block, 0) + table.numpy()

    def by_block(self) -> dict[int, list[list[int]]]:
        return {block: table.tolist() for block, table in sorted(self.tables.items())}


def save_captioned_grid(images: torch.Tensor, prompts: list[str], path: str | Path, min_tile: int = 64,
                        max_width: int = 1600) -> np.ndarray:
    """One row per prompt (images (P, n, C, H, W) in [0, 1]), its prompt written above it; the
    page widens (up to `max_width` pixels) for long prompts, and longer ones end in '...'.
    Returns the page (HWC uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    from moedit.diffusion.grid import make_grid

    num_prompts, per_prompt = images.shape[:2]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [f"{p}: {prompt}" for p, prompt in enumerate(prompts)]
    strips = [make_grid(images[p], nrow=per_prompt, min_tile=min_tile) for p in range(num_prompts)]
    longest = max(measure.textlength(label, font=font) for label in labels)
    width = max(max(s.shape[1] for s in strips), min(max_width, int(longest) + 6))
    rows = []
    for label, strip in zip(labels, strips):
        while len(label) > 4 and measure.textlength(label, font=font) > width - 6:
            label = label[:-4] + "..."  # still too long: shorten, keeping the index
        line = Image.new("RGB", (width, 16), "white")
        ImageDraw.Draw(line).text((3, 2), label, fill="black", font=font)
        padded = np.full((strip.shape[0], width, 3), 255, dtype=np.uint8)
        padded[:, :strip.shape[1]] = strip
        rows += [np.asarray(line), padded]
    page = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(page).save(path, format="PNG")
    return page
