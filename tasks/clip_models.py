"""CLIP model loading shared by extract-clip and curate.

CLEAR's configs name OpenAI CLIP models the way the `clip` package does (`RN50`,
`RN101`, `RN50x4`, `ViT-B/32`). open_clip spells them `RN50`, `RN101`, `RN50x4` and
`ViT-B-32`, and its `openai` weights were trained with QuickGELU, so `load_clip` maps
the names and turns QuickGELU on whenever the pretrained tag's config sets `quick_gelu`. Any other
open_clip architecture is accepted under its open_clip name.

`clear-tiny` is a small ViT (64-dimensional embeddings, 32 px images) for tests and the
embedded sample run. Its weights come from a fixed seed, written by

    python -m tasks.clip_models write-tiny-checkpoint .cache/models/clear-tiny.pt

and load through the same checkpoint path as real weights. They carry no semantic
meaning, and loading them logs a WARNING that says so.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError, StageError, one_line_reason
from tasks.storage import open_input

logger = logging.getLogger(__name__)

TINY_MODEL = "clear-tiny"
TINY_SEED = 0
DEFAULT_PRETRAINED = "openai"

# CLEAR config name -> open_clip architecture name.
CLEAR_MODEL_NAMES = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "ViT-B/32": "ViT-B-32",
}


@dataclass(frozen=True)
class LoadedClip:
    """An open_clip model in eval mode with its inference transform and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    name: str
    open_clip_name: str
    pretrained: str | None
    checkpoint: str | None
    checkpoint_sha256: str | None
    embed_dim: int
    image_size: int

    def identity(self) -> dict:
        """Return the options that determine the embeddings, for manifests and mismatch checks."""
        return {"model": self.name, "open_clip_model": self.open_clip_name,
                "pretrained": self.pretrained, "checkpoint_sha256": self.checkpoint_sha256,
                "embed_dim": self.embed_dim}


def register_tiny_model() -> None:
    """Add the `clear-tiny` architecture to open_clip's registry (idempotent)."""
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return
    config = resources.files("tasks.configs") / "models" / f"{TINY_MODEL}.json"
    with resources.as_file(config) as path:
        open_clip.add_model_config(path)


def valid_model_names() -> list[str]:
    return [*CLEAR_MODEL_NAMES, TINY_MODEL]


def resolve_model_name(name: str) -> str:
    """Map a CLEAR or open_clip model name to an open_clip architecture name.

    Raises ConfigError, listing the valid names, when open_clip has no such architecture.
    """
    import open_clip

    register_tiny_model()
    if name in CLEAR_MODEL_NAMES:
        return CLEAR_MODEL_NAMES[name]
    if name in open_clip.list_models():
        return name
    raise ConfigError(
        f"unknown CLIP model {name!r}: valid CLEAR names are {', '.join(valid_model_names())}; "
        "any open_clip architecture is accepted too (list them with "
        "`python -c 'import open_clip; print(open_clip.list_models())'`)"
    )


def model_slug(name: str) -> str:
    """Return the folder name of a model's outputs: `ViT-B/32` becomes `ViT-B-32`."""
    return name.replace("/", "-")


def resolve_weights(name: str, pretrained: str | None,
                    checkpoint: str | None) -> tuple[str | None, str | None]:
    """Check the weight options of `name` and fill in CLEAR's default tag.

    Returns `(pretrained, checkpoint)` with exactly one of them set. CLEAR names default
    to the `openai` tag; every other model needs one of the two, because open_clip would
    otherwise build it with random weights.
    """
    import open_clip

    open_clip_name = resolve_model_name(name)
    if pretrained and checkpoint:
        raise ConfigError(f"model {name!r}: pass either --pretrained ({pretrained!r}) or "
                          f"--checkpoint ({checkpoint!r}), not both")
    if checkpoint:
        return None, checkpoint
    if name == TINY_MODEL:
        if pretrained:
            raise ConfigError(f"model {TINY_MODEL!r} has no pretrained tags; pass --checkpoint "
                              "with a file written by `python -m tasks.clip_models "
                              "write-tiny-checkpoint PATH`")
        raise ConfigError(f"model {TINY_MODEL!r} needs --checkpoint; write one with "
                          "`python -m tasks.clip_models write-tiny-checkpoint "
                          ".cache/models/clear-tiny.pt`")
    if not pretrained:
        if name not in CLEAR_MODEL_NAMES:
            tags = open_clip.list_pretrained_tags_by_model(open_clip_name)
            raise ConfigError(f"model {name!r} needs --pretrained TAG or --checkpoint PATH; "
                              f"its pretrained tags are {', '.join(tags) or 'none'}")
        pretrained = DEFAULT_PRETRAINED
    tags = open_clip.list_pretrained_tags_by_model(open_clip_name)
    if pretrained not in tags:
        raise ConfigError(f"unknown pretrained tag {pretrained!r} for model {name!r}; valid "
                          f"tags: {', '.join(tags) or 'none (use --checkpoint)'}")
    return pretrained, None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_clip(name: str, pretrained: str | None = None, checkpoint: str | None = None,
              device: str = "cpu") -> LoadedClip:
    """Load an open_clip model, its inference transform and its tokenizer.

    `checkpoint` is a local path, file:// or s3:// URI of a state dict. The model is
    returned in fp32 and eval mode; callers choose mixed precision with autocast.
    Raises ConfigError for invalid names, tags or missing files, and StageError when
    pretrained weights cannot be downloaded.
    """
    import open_clip

    open_clip_name = resolve_model_name(name)
    pretrained, checkpoint = resolve_weights(name, pretrained, checkpoint)
    tag_config = open_clip.get_pretrained_cfg(open_clip_name, pretrained) if pretrained else {}
    quick_gelu = bool(tag_config.get("quick_gelu", False))

    if checkpoint:
        try:
            with open_input(checkpoint) as path:
                sha256 = file_sha256(path)
                model, preprocess = _create_from_checkpoint(open_clip_name, path, checkpoint,
                                                            device)
        except StageError as error:
            raise ConfigError(f"cannot read checkpoint of model {name!r}: {error}") from error
    else:
        sha256 = None
        model, preprocess = _create(open_clip_name, pretrained, device, quick_gelu)

    if name == TINY_MODEL:
        logger.warning("model %s uses weights from a fixed random seed: its embeddings carry "
                       "no semantic meaning, so retrieval results are arbitrary; use a real "
                       "model such as ViT-B/32 for a real benchmark", name)
    model.eval()
    model_config = open_clip.get_model_config(open_clip_name)
    image_size = model_config["vision_cfg"].get("image_size", 224)
    loaded = LoadedClip(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(open_clip_name),
        name=name, open_clip_name=open_clip_name, pretrained=pretrained, checkpoint=checkpoint,
        checkpoint_sha256=sha256, embed_dim=int(model_config["embed_dim"]),
        image_size=int(image_size[0] if isinstance(image_size, list | tuple) else image_size),
    )
    logger.info("loaded CLIP model %s (open_clip %s, %s) on %s, embedding dim %d", name,
                open_clip_name, f"pretrained {pretrained}" if pretrained
                else f"checkpoint {checkpoint} sha256 {sha256[:12]}", device, loaded.embed_dim)
    return loaded


def _create_from_checkpoint(open_clip_name: str, path: Path, checkpoint: str, device: str):
    """Build the model with the state dict in `path`, the local copy of `checkpoint`."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            open_clip_name, pretrained=str(path), device=device)
    except (RuntimeError, EOFError, IsADirectoryError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:
        # torch.load raises UnpicklingError or EOFError for a file that is not a
        # checkpoint, RuntimeError for a broken zip archive, and open_clip raises
        # RuntimeError when the state dict does not fit the architecture.
        raise StageError(f"cannot load checkpoint {checkpoint!r} into open_clip model "
                         f"{open_clip_name!r} ({one_line_reason(error)}); pass a state dict "
                         "saved with torch.save for this model") from error
    return model, preprocess


def _create(open_clip_name: str, weights: str, device: str, quick_gelu: bool):
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            open_clip_name, pretrained=weights, device=device, force_quick_gelu=quick_gelu)
    except RuntimeError as error:
        # open_clip raises RuntimeError for failed downloads and mismatched state dicts.
        raise StageError(f"cannot load pretrained weights {weights!r} into open_clip model "
                         f"{open_clip_name!r} ({one_line_reason(error)}); check the network "
                         "or pass a local --checkpoint") from error
    return model, preprocess


def embed_prompts(model, tokenizer, concepts: list[str],
                  templates: list[str] | None = None):
    """Embed text prompts into L2-normalized float32 vectors, one row per concept.

    With `templates` (strings containing `{}`), each concept is put into every template,
    and the normalized embeddings are averaged and normalized again, as CLIP's zero-shot
    prompt ensembling does. Returns a numpy array of shape (len(concepts), embed_dim).
    """
    import torch
    import torch.nn.functional as F

    templates = templates or ["{}"]
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for concept in concepts:
            tokens = tokenizer([template.format(concept) for template in templates]).to(device)
            embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
            rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(rows).cpu().numpy()


def write_tiny_checkpoint(path: Path, seed: int = TINY_SEED) -> str:
    """Write deterministic `clear-tiny` weights to `path` atomically; return their sha256."""
    import open_clip
    import torch

    register_tiny_model()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None, device="cpu")
    # torch.save names the archive's root folder after the file, so saving to a buffer
    # keeps the bytes independent of the temporary name.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.clip_models",
                                     description="Helpers for the CLIP models of the pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("write-tiny-checkpoint",
                               help=f"write deterministic weights of the {TINY_MODEL} test model")
    tiny.add_argument("path", type=Path, help="output file, e.g. .cache/models/clear-tiny.pt")
    tiny.add_argument("--seed", type=int, default=TINY_SEED,
                      help=f"random seed of the weights (default: {TINY_SEED})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sha256 = write_tiny_checkpoint(args.path, args.seed)
    logger.info("wrote %s weights to %s (sha256 %s)", TINY_MODEL, args.path, sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
