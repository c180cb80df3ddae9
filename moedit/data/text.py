"""Captions -> frozen text-encoder features, for text-to-image conditioning.

A text encoder is a LOCAL directory holding a Hugging Face `transformers` text model and its
tokenizer (saved with `save_pretrained`): a CLIP text model (config `model_type` clip_text_model,
as CLIPTextModel / CLIPTextModelWithProjection save it, or a whole CLIP model, model_type clip) or
a T5 encoder (model_type t5, as T5EncoderModel saves it). Nothing is ever downloaded. Captions are
tokenized, padded or cut to `max_length` tokens and encoded without gradients in float32; the
features of padded positions are zero and the mask is true exactly for real tokens.

`make_tiny_text_encoder` writes a stand-in for the built-in digits: a 2-layer CLIP text model with
RANDOM weights and a word-level tokenizer built locally. It is not a pretrained model; it only
gives every caption a fixed, distinct feature sequence to condition on.

transformers is imported only inside the functions that need it (`pip install 'moedit[text]'`).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from moedit.errors import MoeditError

TEXT_ENCODER_TYPES = ("clip", "t5", "random")
DEFAULT_MAX_LENGTH = {"clip": 77, "t5": 120, "random": 120}
RANDOM_PREFIX = "random:"
"""`--text-encoder random:WIDTH`: no model, random features per caption (benchmarks of the text path)."""
# config.json model_type -> encoder type
MODEL_TYPES = {"clip_text_model": "clip", "clip": "clip", "t5": "t5"}
TEXT_ENCODER_HELP = (
    "pass --text-encoder DIR, a local directory holding a transformers CLIP text model "
    "(CLIPTextModel / CLIPTextModelWithProjection) or T5 encoder (T5EncoderModel) with its tokenizer, "
    "saved with save_pretrained (config.json, weights, tokenizer files); moedit never downloads weights"
)
STAND_IN_MARKER = "MOEDIT_STAND_IN.md"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTION_TEMPLATES = (
    "a handwritten {digit}",
    "the digit {word}",
    "a picture of the number {digit}",
    "a handwritten digit {word}",
    "the number {word}, written by hand",
    "an image of a {digit}",
)


def digit_caption(label: int, index: int) -> str:
    """The caption of built-in digits item `index` with class `label`: one of
    DIGIT_CAPTION_TEMPLATES, chosen by a hash of the index (the same on every run and machine)."""
    if not 0 <= label < len(DIGIT_WORDS):
        raise ValueError(f"digit label {label} is not in [0, 10)")
    template = DIGIT_CAPTION_TEMPLATES[zlib.crc32(f"digit {index}".encode()) % len(DIGIT_CAPTION_TEMPLATES)]
    return template.format(digit=label, word=DIGIT_WORDS[label])


def digit_captions(label: int) -> list[str]:
    """Every phrasing of one digit's caption (for prompts files and tests)."""
    return [t.format(digit=label, word=DIGIT_WORDS[label]) for t in DIGIT_CAPTION_TEMPLATES]


# ---- reading an encoder directory ---------------------------------------------------------
def read_encoder_config(path: str | os.PathLike | None) -> tuple[str, int, dict[str, Any]]:
    """(type clip | t5, feature width, config.json) of a local encoder directory, without loading
    weights or importing transformers; a one-line MoeditError for a missing or unusable one."""
    if not path:
        raise MoeditError(f"captions need a text encoder: {TEXT_ENCODER_HELP}")
    path = os.fspath(path)
    if path.startswith(RANDOM_PREFIX):
        return "random", RandomTextFeatures.parse_width(path), {}
    config = read_config_json(path, "text encoder", TEXT_ENCODER_HELP)
    model_type = config.get("model_type")
    kind = MODEL_TYPES.get(model_type)
    if kind is None:
        raise MoeditError(f"text encoder {path}: model_type {model_type!r} is not a CLIP text model or a T5 encoder "
                          f"(config.json model_type must be one of {', '.join(MODEL_TYPES)})")
    if kind == "clip":
        text_config = config.get("text_config", {}) if model_type == "clip" else config
        width = int(text_config.get("hidden_size", 512))  # CLIPTextConfig's default when unset
    else:
        width = int(config.get("d_model", 512))
    return kind, width, config


def default_max_length(kind: str) -> int:
    """Tokens per caption when none is configured: 77 for CLIP, 120 for T5 (PixArt-alpha's)."""
    return DEFAULT_MAX_LENGTH[kind]


class TextEncoder:
    """A frozen local text encoder: `encode(captions, max_length)` -> (features, mask)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.kind, self.width, config = read_encoder_config(path)
        self.path, self.device = os.path.abspath(os.fspath(path)), device
        if self.kind == "clip":
            text_config = config.get("text_config", {}) if config.get("model_type") == "clip" else config
            self.max_positions: int | None = int(text_config.get("max_position_embeddings", 77))
        else:
            self.max_positions = None  # T5's relative positions take any length
        try:
            import transformers
        except ImportError:
            raise MoeditError("text encoders need transformers: pip install 'moedit[text]'") from None
        transformers.utils.logging.disable_progress_bar()
        model_class = transformers.CLIPTextModel if self.kind == "clip" else transformers.T5EncoderModel
        verbosity = transformers.utils.logging.get_verbosity()
        # a whole CLIP model's vision weights are expected leftovers: no load report for them
        transformers.utils.logging.set_verbosity_error()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = model_class.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError...: all one problem here
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MoeditError(f"text encoder {path}: cannot load its {model_class.__name__} and tokenizer "
                              f"({detail}); {TEXT_ENCODER_HELP}") from None
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        self.model = model.float().to(device).eval().requires_grad_(False)

    def manifest_entry(self, max_length: int) -> dict[str, Any]:
        """The manifest's `text_encoder` record."""
        return {"path": self.path, "type": self.kind, "width": self.width, "max_length": int(max_length)}

    def encode(self, captions: list[str], max_length: int, batch_size: int = 64) -> tuple[Any, Any]:
        """(features float32 (N, L, D), mask bool (N, L)) on the CPU, L = max_length: captions
        padded or cut to L tokens; padded positions have zero features and a false mask."""
        import torch

        if max_length < 1:
            raise MoeditError(f"text max length {max_length}: use 1 or more")
        if self.max_positions is not None and max_length > self.max_positions:
            raise MoeditError(f"text encoder {self.path}: max length {max_length} exceeds the CLIP model's "
                              f"{self.max_positions} positions; use --text-max-length {self.max_positions} or less")
        features, masks = [], []
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                batch = [str(c) for c in captions[start : start + batch_size]]
                tokens = self.tokenizer(batch, padding="max_length", truncation=True, max_length=max_length,
                                        return_tensors="pt")
                ids = tokens["input_ids"].to(self.device)  # (b, L)
                mask = tokens["attention_mask"].to(self.device).bool()  # (b, L)
                hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (b, L, D)
                features.append((hidden.float() * mask[..., None]).cpu())
                masks.append(mask.cpu())
        if not features:
            return torch.zeros(0, max_length, self.width), torch.zeros(0, max_length, dtype=torch.bool)
        return torch.cat(features), torch.cat(masks)


def read_config_json(path: str, what: str, help_text: str) -> dict[str, Any]:
    """The config.json of a local model directory (a text or REPA encoder), as a dict; one-line
    MoeditErrors naming `what` and `path` for a missing directory or file, or unreadable JSON."""
    if not os.path.isdir(path):
        raise MoeditError(f"{what} directory {path} not found: {help_text}")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise MoeditError(f"no {what} at {path} (config.json missing): {help_text}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeditError(f"{what} {path}: cannot read config.json ({exc})") from None
    if not isinstance(config, dict):
        raise MoeditError(f"{what} {path}: config.json is not a JSON object: {help_text}")
    return config


def parse_random_width(spec: str, flag: str, example: int) -> int:
    """WIDTH of a `random:WIDTH` feature spec (text or REPA features); a one-line error naming `flag`."""
    try:
        width = int(spec[len(RANDOM_PREFIX):])
    except ValueError:
        width = 0
    if width < 1:
        raise MoeditError(f"{flag} {spec}: random features need a width, e.g. {RANDOM_PREFIX}{example}")
    return width


class RandomTextFeatures:
    """`--text-encoder random:WIDTH`: no model; each caption gets standard-normal features seeded by
    its text (the same caption, the same features) over 2 + its word count tokens (capped at the
    max length), zeros and a false mask after. For measuring the text path's cost (benchmarks/
    train.py's text rows: T5-XXL's 4096 x 120 without a T5), not for learning from captions."""

    kind = "random"

    def __init__(self, spec: str):
        self.width, self.path = self.parse_width(spec), spec

    @staticmethod
    def parse_width(spec: str) -> int:
        return parse_random_width(spec, "--text-encoder", 4096)

    def manifest_entry(self, max_length: int) -> dict[str, Any]:
        return {"path": self.path, "type": self.kind, "width": self.width, "max_length": int(max_length)}

    def encode(self, captions: list[str], max_length: int, batch_size: int = 64) -> tuple[Any, Any]:
        import hashlib

        import numpy as np
        import torch

        features = torch.zeros(len(captions), max_length, self.width)
        mask = torch.zeros(len(captions), max_length, dtype=torch.bool)
        for i, caption in enumerate(captions):
            seed = int.from_bytes(hashlib.sha256(str(caption).encode()).digest()[:8], "little")
            n = min(max_length, 2 + len(str(caption).split()))
            values = np.random.default_rng(seed).standard_normal((n, self.width), dtype=np.float32)
            features[i, :n], mask[i, :n] = torch.from_numpy(values), True
        return features, mask


def load_text_encoder(path: str | os.PathLike | None, device: str = "cpu") -> TextEncoder | RandomTextFeatures:
    """A frozen local text encoder (CLIP text model or T5 encoder, by config.json model_type), or
    random features for `random:WIDTH`. Errors, one line each: no path, a missing directory, no
    config.json, another model type, or weights/tokenizer transformers cannot load."""
    if path is not None and os.fspath(path).startswith(RANDOM_PREFIX):
        return RandomTextFeatures(os.fspath(path))
    return TextEncoder(path, device)


def encode_captions(encoder_dir: str | os.PathLike, captions: list[str], max_length: int | None = None,
                    device: str = "cpu") -> tuple[Any, Any]:
    """Encode captions with the encoder in `encoder_dir`: (features float32 (N, L, D), mask bool
    (N, L)) on the CPU; L = max_length (default: 77 for CLIP, 120 for T5). The shards store the
    same features as float16 (`moedit sample --prompt` conditions on these)."""
    encoder = load_text_encoder(encoder_dir, device)
    return encoder.encode(list(captions), max_length or default_max_length(encoder.kind))


# ---- the stand-in for the built-in digits ---------------------------------------------------
def make_tiny_text_encoder(directory: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny RANDOM-weight CLIP text model (width 64, 2 layers, 4 heads, 77 positions) and a
    word-level tokenizer covering the digit captions (plus [PAD], [UNK], [BOS], [EOS]) into
    `directory`, built locally without any download; returns the directory, which then loads
    like any other local encoder. The same seed gives the same weights. A stand-in, not a
    pretrained model: it tells captions apart but knows no language."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, STAND_IN_MARKER)) and os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    transformers.utils.logging.disable_progress_bar()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for label in range(10) for caption in digit_captions(label)
                    for w, _ in pre.pre_tokenize_str(caption.lower())})
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=77)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[BOS]"],
        eos_token_id=vocab["[EOS]"], projection_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPTextModel(config).eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    wrapped.save_pretrained(directory)
    with open(os.path.join(directory, STAND_IN_MARKER), "w") as f:
        f.write(f"A stand-in text encoder made by moedit.data.text.make_tiny_text_encoder (seed {seed}): a tiny CLIP "
                "text model with RANDOM weights and a word-level tokenizer for the digit captions. It is not a "
                "pretrained model. Point --text-encoder at a real CLIP text model or T5 encoder for real captions.\n")
    return directory
