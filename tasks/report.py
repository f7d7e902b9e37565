"""Print where a pipeline run put its outputs and the labeled images per bucket and class.

`python -m tasks.report --artifact-root ROOT [--check]`. With `--check` it exits with
status 1 when an expected output of the main pipeline is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from tasks.storage import ArtifactStore

# Output groups the main job must produce: (label, key prefix, file suffix).
EXPECTED = [
    ("metadata Parquet parts", "metadata/", ".parquet"),
    ("shard tars", "images/", ".tar"),
    ("shard manifests", "images/", ".parquet"),
    ("bucket manifests", "buckets/", ".parquet"),
    ("CLIP embeddings", "features/", ""),
    ("MoCo checkpoints", "models/moco/", ".pth.tar"),
]


def labeled_counts(store: ArtifactStore, keys: list[str]) -> dict[str, Counter]:
    """Count `datasets/<name>/labeled_images/<bucket>/<class>/<file>` keys per dataset."""
    counts: dict[str, Counter] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) == 6 and parts[2] == "labeled_images":
            counts.setdefault(parts[1], Counter())[(parts[3], parts[4])] += 1
    return counts


def format_table(counts: Counter) -> str:
    buckets = sorted({bucket for bucket, _ in counts}, key=lambda b: (len(b), b))
    classes = sorted({name for _, name in counts})
    width = max([len(name) for name in classes] + [5])
    lines = ["class".ljust(width) + "".join(f"{b:>7}" for b in buckets) + "    total"]
    for name in classes:
        row = [counts[(bucket, name)] for bucket in buckets]
        lines.append(name.ljust(width) + "".join(f"{n:>7}" for n in row) + f"{sum(row):>9}")
    totals = [sum(counts[(bucket, name)] for name in classes) for bucket in buckets]
    lines.append("total".ljust(width) + "".join(f"{n:>7}" for n in totals) + f"{sum(totals):>9}")
    return "\n".join(lines)


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
    datasets = labeled_counts(store, keys)
    for name, counts in sorted(datasets.items()):
        print(f"\nDataset {name} ({store.url('datasets/' + name)}): labeled images per bucket "
              "and class")
        print(format_table(counts))
    if not datasets:
        missing.append("curated dataset with labeled_images/<bucket>/<class>/")
    if missing and args.check:
        print(f"\nerror: missing outputs: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
