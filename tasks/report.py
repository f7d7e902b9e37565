"""Print where a pipeline run put its outputs and the labeled images per bucket and class.

`python -m tasks.report --artifact-root ROOT [--check]`. With `--check` it exits with
status 1 when an expected output of the main pipeline is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from tasks.curate_report import format_counts_table
from tasks.storage import ArtifactStore

# Output groups the main job must produce: (label, key prefix, file suffix).
EXPECTED = [
    ("metadata Parquet parts", "metadata/", ".parquet"),
    ("shard plans", "shards/", ".parquet"),
    ("shard tars", "images/", ".tar"),
    ("shard manifests", "images/", ".parquet"),
    ("bucket manifests", "buckets/", ".parquet"),
    ("CLIP embedding chunks", "features/", ".npz"),
    ("MoCo checkpoints", "models/moco/", ".pth.tar"),
]
# Parts of each curated dataset folder: (label, path inside datasets/<name>/).
DATASET_PARTS = [
    ("labeled images", "labeled_images/"),
    ("file lists", "filelists/"),
    ("backbone features", "features/"),
    ("train/test splits", "training_folder/"),
    ("report (counts.csv, contact sheets)", "report/"),
]
TINY_MODEL_NOTE = ("NOTE: the embeddings come from the tiny CLIP model with weights from a "
                   "fixed seed, so the curated classes carry no semantic meaning. Pass a real "
                   "open_clip model and pretrained tag for real benchmarks.")


def labeled_counts(keys: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Count `datasets/<name>/labeled_images/<bucket>/<class>/<file>` keys.

    Returns `{dataset: {bucket: {class: count}}}` with buckets in numeric order.
    """
    counts: dict[str, dict[str, Counter]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) == 6 and parts[2] == "labeled_images":
            counts.setdefault(parts[1], {}).setdefault(parts[3], Counter())[parts[4]] += 1
    return {name: {bucket: dict(by_bucket[bucket])
                   for bucket in sorted(by_bucket, key=lambda b: (len(b), b))}
            for name, by_bucket in counts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.report", description=__doc__)
    parser.add_argument("--artifact-root", required=True, help="artifact root of the run")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when an expected output is missing")
    args = parser.parse_args(argv)

    store = ArtifactStore(args.artifact_root)
    keys = store.list()
    missing = []
    print(f"Outputs under {store.url('')}")
    for label, prefix, suffix in EXPECTED:
        found = [key for key in keys if key.startswith(prefix) and key.endswith(suffix)]
        print(f"  {label:<24} {len(found):>5}  {store.url(prefix)}")
        if not found:
            missing.append(label)
    datasets = labeled_counts(keys)
    for name, counts in sorted(datasets.items()):
        prefix = f"datasets/{name}/"
        print(f"\nDataset {name} at {store.url(prefix)}")
        for label, part in DATASET_PARTS:
            found = sum(1 for key in keys if key.startswith(prefix + part))
            print(f"  {label:<36} {found:>5} files  {store.url(prefix + part)}")
        class_names = sorted({n for by_class in counts.values() for n in by_class})
        print("Labeled images per bucket and class (with ALLOW_OVERLAP one photo may carry "
              "several labels):")
        print("\n".join(format_counts_table(counts, class_names)))
    if any(key.split("/")[2:3] == ["clear-tiny"] for key in keys if key.startswith("features/")):
        print("\n" + TINY_MODEL_NOTE)
    if not datasets:
        missing.append("curated dataset with labeled_images/<bucket>/<class>/")
    if missing and args.check:
        print(f"\nerror: missing outputs: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
