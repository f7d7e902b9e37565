"""extract-features: apply a frozen backbone to every labeled image of a curated dataset.

The backbone is the query encoder of a MoCo checkpoint without its projection head
(`--moco-run` takes the run's latest checkpoint, `--checkpoint` one file), or, only when
`--random-init` is passed, a randomly initialised torchvision ResNet. Images are read
through `filelists/<bucket>.txt` of the buckets listed in `labeled_metadata.json`, which
curate writes when it finishes, resized and center-cropped to `--image-size` as in
CLEAR's feature script, and encoded in file order.

Outputs under `datasets/<NAME>/features/<name>/`, in the layout of CLEAR's
`prepare_features.py` that Avalanche's CLEAR feature reader loads:

- `<bucket>/<class>.pth`: a dict from photo id (str) to a 1-D float32 feature tensor,
  one file per class in `class_names.txt`, empty for a class without samples;
- `features.json`: `{bucket: {class: "features/<name>/<bucket>/<class>.pth"}}`, paths
  relative to the dataset folder; written when every bucket is done;
- `extraction.json`: how the features were made (backbone source and its SHA-256, arch,
  image size, feature size) and the buckets finished so far.

Re-running skips the buckets listed in `extraction.json`, and fails when the backbone
or options differ from the ones recorded there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tasks.clear_layout import (
    dataset_prefix,
    list_buckets,
    read_class_names,
    read_filelist,
    validate_dataset_name,
)
from tasks.errors import ConfigError, StageError, one_line_reason
from tasks.options import require_minimum
from tasks.storage import ArtifactStore, is_s3_uri, open_input

logger = logging.getLogger(__name__)

FEATURE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
EXTRACTION_FORMAT = 1


@dataclass(frozen=True)
class Config:
    artifact_root: str
    dataset: str
    name: str = "moco_b0"
    moco_run: str | None = None
    checkpoint: str | None = None
    random_init: bool = False
    arch: str | None = None
    image_size: int = 224
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        import re

        from tasks.moco import RESNET_ARCHS, RUN_NAME_PATTERN

        validate_dataset_name(args.dataset)
        if not re.match(FEATURE_NAME_PATTERN, args.name):
            raise ConfigError(f"--name {args.name!r} is not a valid feature name; use letters, "
                              "digits, '.', '_' and '-'")
        sources = [bool(args.moco_run), bool(args.checkpoint), args.random_init]
        if sum(sources) != 1:
            raise ConfigError("pass exactly one backbone source: --moco-run RUN, --checkpoint "
                              "KEY_OR_PATH, or --random-init for an untrained backbone")
        if args.moco_run and not RUN_NAME_PATTERN.match(args.moco_run):
            raise ConfigError(f"--moco-run {args.moco_run!r} is not a valid run name; use "
                              "letters, digits, '.', '_' and '-', as for train-moco --run")
        if args.arch is not None and args.arch not in RESNET_ARCHS:
            raise ConfigError(f"--arch {args.arch!r} is not supported; valid choices: "
                              f"{', '.join(RESNET_ARCHS)}")
        require_minimum({"--image-size": args.image_size, "--batch-size": args.batch_size})
        if args.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
        return cls(args.artifact_root, args.dataset, args.name, args.moco_run, args.checkpoint,
                   args.random_init, args.arch, args.image_size, args.batch_size, args.workers,
                   args.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True,
                        help="curated dataset name; reads and writes datasets/<NAME>/")
    parser.add_argument("--name", default="moco_b0",
                        help="feature set name; outputs go to datasets/<NAME>/features/<name>/ "
                        "(default: moco_b0)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--moco-run", default=None,
                        help="use the latest checkpoint of models/moco/<RUN>/")
    source.add_argument("--checkpoint", default=None,
                        help="use this checkpoint: a key under the artifact root, a local "
                        "path, file:// or s3:// URI; a MoCo checkpoint or a plain backbone "
                        "state dict")
    source.add_argument("--random-init", action="store_true",
                        help="use a randomly initialised backbone (seed 0), as a baseline")
    parser.add_argument("--arch", default=None,
                        help="torchvision ResNet of the backbone (default: the checkpoint's "
                        "`arch`; resnet50 with --random-init)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="resize the short side to this many pixels and center-crop a "
                        "square of it (default: 224)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward pass (default: 64)")
    parser.add_argument("--workers", type=int, default=4,
                        help="DataLoader worker processes (default: 4)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="device; auto uses CUDA when available (default: auto)")


def run(config: Config) -> dict:
    store = ArtifactStore(config.artifact_root)
    prefix = dataset_prefix(config.dataset)
    output_prefix = f"{prefix}/features/{config.name}"
    class_names = read_class_names(store, prefix)
    buckets = list_buckets(store, prefix)

    backbone_state, source = load_backbone_source(store, config)
    extraction_key = f"{output_prefix}/extraction.json"
    record = start_extraction_record(store, extraction_key, config, source)
    pending = [bucket for bucket in buckets if bucket not in record["buckets"]]
    if not pending:
        logger.info("features %s of dataset %s are complete; nothing to do", config.name,
                    config.dataset)
        write_feature_index(store, output_prefix, config.name, buckets, class_names)
        return build_summary(config, record, skipped=len(buckets))

    device = select_device(config.device)
    model = build_model(backbone_state, source["arch"], device)
    for bucket in pending:
        samples = read_filelist(store, prefix, bucket, class_names)
        features = extract_bucket(store, prefix, samples, model, config, device)
        write_bucket_features(store, output_prefix, bucket, samples, features, class_names)
        record["feature_dim"] = int(features.shape[1]) if len(samples) else record["feature_dim"]
        record["buckets"][bucket] = {"samples": len(samples)}
        store.write_json(extraction_key, record)
        logger.info("bucket %s: wrote features of %d samples to %s", bucket, len(samples),
                    store.url(f"{output_prefix}/{bucket}/"))

    write_feature_index(store, output_prefix, config.name, buckets, class_names)
    return build_summary(config, record, skipped=len(buckets) - len(pending))


def build_summary(config: Config, record: dict, skipped: int) -> dict:
    return {"dataset": config.dataset, "name": config.name, "arch": record["arch"],
            "buckets": len(record["buckets"]), "buckets_skipped": skipped,
            "samples": sum(entry["samples"] for entry in record["buckets"].values()),
            "feature_dim": record["feature_dim"]}


def select_device(request: str) -> str:
    import torch

    if request == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda was requested but no CUDA device is visible; use "
                         "--device cpu")
    return "cuda" if request != "cpu" and torch.cuda.is_available() else "cpu"


def load_backbone_source(store: ArtifactStore, config: Config) -> tuple[dict | None, dict]:
    """Load the backbone state dict and describe where it came from.

    Returns `(state_dict, source)`; the state dict is None for `--random-init`.
    """
    if config.random_init:
        arch = config.arch or "resnet50"
        logger.warning("extracting features with a randomly initialised %s, as "
                       "--random-init requests; these are baseline features, not "
                       "pre-trained ones", arch)
        return None, {"kind": "random-init", "arch": arch, "seed": 0}

    if config.moco_run:
        from tasks.moco import latest_checkpoint_key

        key = latest_checkpoint_key(store, f"models/moco/{config.moco_run}")
        if key is None:
            run_url = store.url(f"models/moco/{config.moco_run}")
            raise StageError(f"no checkpoint found under {run_url}; run train-moco with this "
                             "--run first, or pass --checkpoint")
        location = key
    else:
        location = config.checkpoint

    checkpoint, digest = read_checkpoint(store, location)
    state_dict = checkpoint.get("state_dict", checkpoint)
    saved_arch = checkpoint.get("arch")
    if saved_arch and config.arch and saved_arch != config.arch:
        raise ConfigError(f"--arch {config.arch} differs from the checkpoint's arch "
                          f"{saved_arch}; drop --arch to use the checkpoint's")
    arch = config.arch or saved_arch
    if not arch:
        raise ConfigError(f"checkpoint {location} does not record its arch; pass --arch")

    from tasks.moco_model import backbone_state_dict

    source = {"kind": "checkpoint", "location": location, "sha256": digest, "arch": arch,
              "epoch": checkpoint.get("epoch")}
    return backbone_state_dict(state_dict), source


def read_checkpoint(store: ArtifactStore, location: str) -> tuple[dict, str]:
    """Load a checkpoint from an artifact key, local path or URI; return it and its SHA-256."""
    import pickle

    import torch

    if not is_s3_uri(location) and "://" not in location and store.exists(location):
        opener = store.local_copy(location)
    elif is_s3_uri(location) or location.startswith("file://") or Path(location).exists():
        opener = open_input(location)
    else:
        raise StageError(f"checkpoint {location!r} not found as a key under the artifact root "
                         "or as a file; pass an existing key, path or s3:// URI")
    with opener as path:
        if path.is_dir():
            raise StageError(f"checkpoint {location!r} is a folder; pass the path of a "
                             "checkpoint file in it")
        try:
            digest = sha256_of_file(path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            # torch.load raises UnpicklingError or EOFError for a file that is not a
            # checkpoint, and RuntimeError for a broken zip archive.
            raise StageError(f"cannot load checkpoint {location} with weights_only=True "
                             f"({one_line_reason(error)}); pass a file saved with torch.save "
                             "that contains a dict of tensors") from error
    if not isinstance(checkpoint, dict):
        raise StageError(f"checkpoint {location} holds a {type(checkpoint).__name__}, not a "
                         "state dict or a dict with `state_dict`")
    return checkpoint, digest


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_extraction_record(store: ArtifactStore, key: str, config: Config,
                            source: dict) -> dict:
    """Read the record of an earlier extraction, checking it used the same backbone and options."""
    options = {"format": EXTRACTION_FORMAT, "source": source, "arch": source["arch"],
               "image_size": config.image_size}
    if not store.exists(key):
        return {**options, "feature_dim": None, "buckets": {}}
    record = store.read_json(key)
    differences = [name for name in options if record.get(name) != options[name]]
    if differences:
        raise ConfigError(f"{store.url(key)} was made with a different "
                          f"{', '.join(differences)}; pass a new --name for these features, "
                          "or delete that folder to extract again")
    return record


def build_model(state_dict: dict | None, arch: str, device: str):
    import torch

    from tasks.moco_model import build_backbone

    torch.manual_seed(0)
    model = build_backbone(arch)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise StageError(f"the checkpoint's backbone does not fit a {arch} "
                             f"({one_line_reason(error)}); pass the --arch it was trained "
                             "with") from error
    model.eval().requires_grad_(False).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class LabeledImages:
    """Decoded, resized and center-cropped labeled images of one bucket, in file order."""

    def __init__(self, store: ArtifactStore, prefix: str, paths: list[str], image_size: int):
        from torchvision import transforms

        from tasks.moco_data import IMAGENET_MEAN, IMAGENET_STD

        self.store = store
        self.prefix = prefix
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(image_size), transforms.CenterCrop(image_size),
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import UnidentifiedImageError

        from tasks.images import decode_image

        key = f"{self.prefix}/{self.paths[index]}"
        try:
            image = decode_image(self.store.read_bytes(key))
        except (UnidentifiedImageError, OSError) as error:
            raise StageError(f"cannot decode labeled image {self.store.url(key)} ({error}); "
                             "re-run the curate stage for this bucket") from error
        return self.transform(image)


def extract_bucket(store: ArtifactStore, prefix: str, samples, model, config: Config,
                   device: str):
    """Encode the samples' images; return an N x D float32 CPU tensor in sample order."""
    import torch
    from torch.utils.data import DataLoader

    from tasks.log import ProgressLogger

    dataset = LabeledImages(store, prefix, [sample.path for sample in samples], config.image_size)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                        num_workers=config.workers, pin_memory=device == "cuda")
    memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
    progress = ProgressLogger(logger, "extract-features", len(samples))
    outputs = []
    with torch.inference_mode():
        for images in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            outputs.append(model(images).float().cpu())
            progress.update(len(images))
    progress.close()
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def write_bucket_features(store: ArtifactStore, output_prefix: str, bucket: str, samples,
                          features, class_names: list[str]) -> None:
    """Write one `<bucket>/<class>.pth` per class: photo id -> feature tensor."""
    import torch

    by_class: dict[str, dict] = {name: {} for name in class_names}
    for sample, feature in zip(samples, features, strict=True):
        # clone() so each saved tensor owns its storage instead of the whole batch's.
        by_class[sample.class_name][sample.photo_id] = feature.clone()
    for class_name, class_features in by_class.items():
        with store.staged_file(f"{output_prefix}/{bucket}/{class_name}.pth") as path:
            torch.save(class_features, path)


def write_feature_index(store: ArtifactStore, output_prefix: str, name: str,
                        buckets: list[str], class_names: list[str]) -> None:
    """Write Avalanche's `features.json`: bucket -> class -> path relative to the dataset."""
    index = {bucket: {class_name: f"features/{name}/{bucket}/{class_name}.pth"
                      for class_name in class_names} for bucket in buckets}
    # Written without sorting keys: Avalanche takes the buckets in the file's order.
    store.write_text(f"{output_prefix}/features.json", json.dumps(index, indent=2) + "\n")
