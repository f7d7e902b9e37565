"""split: write per-bucket train/test splits of a curated dataset, one per seed.

Writes the `training_folder/` that Avalanche's CLEAR reader loads for the
`clear10_neurips2021` and `clear100_cvpr2022` layouts (avalanche-lib,
`avalanche/benchmarks/datasets/clear/clear.py`), under `datasets/<NAME>/`:

- `training_folder/bucket_indices.json`: the bucket ids, in order;
- `training_folder/filelists/<bucket>/all.txt`: every labeled sample of the bucket as
  `<path> <class index>`, in the order of the curate stage's `filelists/<bucket>.txt`;
- `training_folder/features/<name>/<bucket>/all.pth`: for every feature set that
  extract-features finished, a tuple (N x D float tensor, list of N class indices) in
  the order of `all.txt`;
- `training_folder/testset_ratio_<r>/split_<seed>/<bucket>/{train,test}.txt` (lines of
  `all.txt`) and `{train,test}_indices.json` (0-based indices into `all.txt` and `all.pth`);
- `training_folder/testset_ratio_<r>/split_<seed>/split.json`: counts per bucket and a
  SHA-256 of the file lists; written last, it marks the split as finished.

The buckets are the ones listed in `labeled_metadata.json`, which curate writes when it
finishes; a dataset without it is rejected.

Each class of each bucket is split on its own (stratified): round(n * ratio) of its n
samples go to the test set. A generator seeded with (seed, bucket, class) picks them,
so a split depends only on its seed and the file lists. Re-running skips finished seeds
and fails when the file lists changed since a split was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass

from tasks.clear_layout import (
    LabeledSample,
    dataset_prefix,
    list_buckets,
    read_class_names,
    read_filelist,
    validate_dataset_name,
)
from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    artifact_root: str
    dataset: str
    test_ratio: float = 0.3
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        validate_dataset_name(args.dataset)
        if not 0.0 < args.test_ratio < 1.0:
            raise ConfigError(f"--test-ratio must be between 0 and 1 (exclusive), got "
                              f"{args.test_ratio}")
        return cls(args.artifact_root, args.dataset, args.test_ratio, parse_seeds(args.seeds))


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise ConfigError(f"--seeds {text!r} is invalid; expected comma-separated integers "
                          "such as 0,1,2,3,4") from error
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must list distinct non-negative integers")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True,
                        help="curated dataset name; reads and writes datasets/<NAME>/")
    parser.add_argument("--test-ratio", type=float, default=0.3,
                        help="fraction of each class in each bucket that goes to the test set "
                        "(default: 0.3)")
    parser.add_argument("--seeds", default="0,1,2,3,4",
                        help="comma-separated seeds; one split is written per seed "
                        "(default: 0,1,2,3,4)")


def run(config: Config) -> dict:
    store = ArtifactStore(config.artifact_root)
    prefix = dataset_prefix(config.dataset)
    training_prefix = f"{prefix}/training_folder"
    class_names = read_class_names(store, prefix)
    buckets = list_buckets(store, prefix)
    samples = {bucket: read_filelist(store, prefix, bucket, class_names) for bucket in buckets}
    digest = digest_filelists(class_names, samples)

    ratio_prefix = f"{training_prefix}/testset_ratio_{config.test_ratio}"
    finished = finished_seeds(store, ratio_prefix, config.seeds, digest)
    write_all_lists(store, training_prefix, samples)
    feature_sets = write_all_features(store, prefix, training_prefix, samples)

    for seed in config.seeds:
        if seed in finished:
            logger.info("split %s of dataset %s is already written; skipping", seed,
                        config.dataset)
            continue
        write_seed_split(store, f"{ratio_prefix}/split_{seed}", samples, config.test_ratio,
                         seed, digest)
        logger.info("wrote split %d (test ratio %s) of dataset %s", seed, config.test_ratio,
                    config.dataset)

    return {"dataset": config.dataset, "test_ratio": config.test_ratio, "buckets": len(buckets),
            "seeds_written": [seed for seed in config.seeds if seed not in finished],
            "seeds_skipped": sorted(finished), "feature_sets": feature_sets}


def digest_filelists(class_names: list[str], samples: dict[str, list[LabeledSample]]) -> str:
    digest = hashlib.sha256("\n".join(class_names).encode())
    for bucket, bucket_samples in samples.items():
        digest.update(f"\0{bucket}\0".encode())
        for sample in bucket_samples:
            digest.update(f"{sample.path} {sample.label}\n".encode())
    return digest.hexdigest()


def finished_seeds(store: ArtifactStore, ratio_prefix: str, seeds, digest: str) -> set[int]:
    """Seeds whose split is complete; raise when one was made from other file lists."""
    finished = set()
    for seed in seeds:
        marker = f"{ratio_prefix}/split_{seed}/split.json"
        if not store.exists(marker):
            continue
        if store.read_json(marker).get("filelists_sha256") != digest:
            raise StageError(f"{store.url(marker)} was written from different file lists; the "
                             "curated dataset changed since. Delete the dataset's "
                             "training_folder/ to split it again")
        finished.add(seed)
    return finished


def format_filelist(samples: list[LabeledSample]) -> str:
    return "".join(f"{sample.path} {sample.label}\n" for sample in samples)


def write_all_lists(store: ArtifactStore, training_prefix: str,
                    samples: dict[str, list[LabeledSample]]) -> None:
    # Written without sorting: Avalanche reads the buckets in this order.
    store.write_text(f"{training_prefix}/bucket_indices.json", json.dumps(list(samples)) + "\n")
    for bucket, bucket_samples in samples.items():
        store.write_text(f"{training_prefix}/filelists/{bucket}/all.txt",
                         format_filelist(bucket_samples))


def write_all_features(store: ArtifactStore, prefix: str, training_prefix: str,
                       samples: dict[str, list[LabeledSample]]) -> list[str]:
    """Gather each finished feature set into per-bucket `all.pth` files; return their names."""
    names = []
    for key in store.list(f"{prefix}/features/"):
        parts = key.split("/")
        if parts[-1] == "features.json" and len(parts) == len(prefix.split("/")) + 3:
            names.append(parts[-2])
    for name in names:
        for bucket, bucket_samples in samples.items():
            target = f"{training_prefix}/features/{name}/{bucket}/all.pth"
            # NOTE: an existing all.pth is kept; re-extracting a feature set under the same
            # name needs training_folder/features/<name>/ deleted first.
            if not store.exists(target):
                write_bucket_feature_table(store, prefix, name, bucket, bucket_samples, target)
    return sorted(names)


def write_bucket_feature_table(store: ArtifactStore, prefix: str, name: str, bucket: str,
                               samples: list[LabeledSample], target: str) -> None:
    import torch

    by_class = {}
    rows = []
    for sample in samples:
        if sample.class_name not in by_class:
            key = f"{prefix}/features/{name}/{bucket}/{sample.class_name}.pth"
            with store.local_copy(key) as path:
                by_class[sample.class_name] = torch.load(path, map_location="cpu",
                                                         weights_only=True)
        feature = by_class[sample.class_name].get(sample.photo_id)
        if feature is None:
            raise StageError(f"feature set {name} has no feature for photo {sample.photo_id} "
                             f"of bucket {bucket}; re-run extract-features with a new --name")
        rows.append(feature)
    table = torch.stack(rows) if rows else torch.empty(0, 0)
    with store.staged_file(target) as path:
        torch.save((table, [sample.label for sample in samples]), path)


def split_indices(samples: list[LabeledSample], test_ratio: float, seed: int,
                  bucket: str) -> tuple[list[int], list[int]]:
    """Split sample indices class by class; return sorted (train, test) indices."""
    by_class: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(index)
    train, test = [], []
    for label, indices in sorted(by_class.items()):
        # A string seed is hashed with SHA-512 by `random`, so the order does not depend
        # on PYTHONHASHSEED or on the other buckets and classes.
        generator = random.Random(f"{seed}/{bucket}/{label}")
        shuffled = indices[:]
        generator.shuffle(shuffled)
        test_count = math.floor(len(shuffled) * test_ratio + 0.5)
        test += shuffled[:test_count]
        train += shuffled[test_count:]
    return sorted(train), sorted(test)


def write_seed_split(store: ArtifactStore, split_prefix: str,
                     samples: dict[str, list[LabeledSample]], test_ratio: float, seed: int,
                     digest: str) -> None:
    counts = {}
    for bucket, bucket_samples in samples.items():
        train, test = split_indices(bucket_samples, test_ratio, seed, bucket)
        for part, indices in (("train", train), ("test", test)):
            store.write_text(f"{split_prefix}/{bucket}/{part}.txt",
                             format_filelist([bucket_samples[i] for i in indices]))
            store.write_text(f"{split_prefix}/{bucket}/{part}_indices.json",
                             json.dumps(indices) + "\n")
        counts[bucket] = {"train": len(train), "test": len(test)}
    store.write_json(f"{split_prefix}/split.json", {
        "seed": seed, "test_ratio": test_ratio, "filelists_sha256": digest,
        "buckets": counts, "stratified_by": "class"})
