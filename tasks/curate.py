"""curate: retrieve labeled concept images per bucket into CLEAR's folder layout.

Reads a CLEAR concept config (`NAME`, `GROUP`, `NUM_OF_IMAGES_PER_CLASS_PER_BUCKET`, ...;
see tasks/curate_config.py), embeds its prompts with the CLIP model whose image
embeddings extract-clip wrote under `features/<split>/<model>/<bucket>/`, selects images
per bucket with CLEAR's rules (tasks/curate_retrieval.py), and writes
`datasets/<NAME>/` (tasks/curate_layout.py) plus a report of counts and contact sheets
(tasks/curate_report.py).

A bucket whose filelist exists is finished and skipped on a re-run. The embeddings of
every bucket to curate are checked before anything is written. While no bucket of NAME
is finished, a re-run may change the config or model. Once one is, a re-run with a
different config or model into the same NAME fails instead of mixing two datasets.
"""

from __future__ import annotations

import argparse
import io
import logging
from dataclasses import dataclass

from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

OPTIONS_FORMAT = 1
CONTACT_SHEET_IMAGES = 8


@dataclass(frozen=True)
class Config:
    artifact_root: str
    config_path: str
    split: str = "default"
    model: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    buckets: tuple[str, ...] | None = None
    exclude_buckets: tuple[str, ...] = ()
    allow_small_classes: bool = False
    device: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        from tasks.clip_models import resolve_weights
        from tasks.curate_config import load_concept_config

        concepts = load_concept_config(args.config)
        model = args.model or concepts.clip_model
        pretrained, checkpoint = resolve_weights(model, args.pretrained, args.checkpoint)
        return cls(artifact_root=args.artifact_root, config_path=args.config, split=args.split,
                   model=model, pretrained=pretrained, checkpoint=checkpoint,
                   buckets=_bucket_list(args.buckets, "--buckets"),
                   exclude_buckets=_bucket_list(args.exclude_buckets, "--exclude-buckets") or (),
                   allow_small_classes=args.allow_small_classes, device=args.device)


def _bucket_list(value: str | None, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    buckets = tuple(part.strip() for part in value.split(",") if part.strip())
    if not buckets:
        raise ConfigError(f"{option} must list bucket ids separated by commas, got {value!r}")
    return buckets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="CLEAR concept config JSON (path, file:// or s3://)")
    parser.add_argument("--split", default="default",
                        help="bucket split written by the segment stage (default: default)")
    parser.add_argument("--model", default=None,
                        help="CLIP model; overrides the config's CLIP_MODEL and must match "
                        "the model extract-clip used")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (default: openai for CLEAR names)")
    parser.add_argument("--checkpoint", default=None,
                        help="state dict file (path, file:// or s3://) instead of a tag")
    parser.add_argument("--buckets", default=None,
                        help="comma-separated bucket ids to curate (default: every bucket "
                        "of the split)")
    parser.add_argument("--exclude-buckets", default=None,
                        help="comma-separated bucket ids to leave out, e.g. 0 when bucket 0 "
                        "is kept unlabeled for pre-training (default: none)")
    parser.add_argument("--allow-small-classes", action="store_true",
                        help="keep a class with fewer images than requested, with a warning, "
                        "instead of failing")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the text encoder runs (default: auto)")


def select_buckets(store: ArtifactStore, config: Config) -> list[str]:
    summary_key = f"buckets/{config.split}/summary.json"
    if not store.exists(summary_key):
        raise StageError(f"no bucket summary at {store.url(summary_key)}; run segment for "
                         f"split {config.split!r} first")
    known = [str(bucket["id"]) for bucket in store.read_json(summary_key)["buckets"]]
    requested = list(config.buckets) if config.buckets is not None else known
    unknown = sorted((set(requested) | set(config.exclude_buckets)) - set(known))
    if unknown:
        raise ConfigError(f"unknown bucket id(s) {', '.join(unknown)} for split "
                          f"{config.split!r}; known buckets: {', '.join(known)}")
    selected = [b for b in requested if b not in config.exclude_buckets]
    if not selected:
        if config.buckets is not None:
            scope = f"--buckets {','.join(requested)}"
        else:
            scope = f"split {config.split!r}"
        raise ConfigError(f"no bucket left to curate: --exclude-buckets "
                          f"{','.join(config.exclude_buckets)} leaves out every bucket of "
                          f"{scope}; exclude fewer buckets")
    return selected


def check_dataset_identity(store: ArtifactStore, prefix: str, raw_config: dict,
                           options: dict, finished: list[str]) -> None:
    """Record the config and model of a dataset, or fail when they differ from a re-run's.

    Files of a dataset without a finished bucket are replaced: nothing was curated
    with them, so a run that failed early does not pin its config.
    """
    to_write = {}
    for name, expected in (("concept_group_dict.json", raw_config),
                           ("curate_options.json", options)):
        key = f"{prefix}/{name}"
        existing = store.read_json(key) if store.exists(key) else None
        if existing == expected:
            continue
        to_write[key] = expected
        if existing is None:
            continue
        changed = sorted(k for k in existing.keys() | expected.keys()
                         if existing.get(k) != expected.get(k))
        if finished:
            raise StageError(f"dataset {store.url(prefix)} has finished bucket(s) "
                             f"{', '.join(finished)}, curated with a different {name} (keys "
                             f"that differ: {', '.join(changed)}); run with the same config "
                             "and model, use another NAME, or delete that folder")
        logger.info("dataset %s has no finished bucket; replacing its %s (keys that differ: "
                    "%s)", store.url(prefix), name, ", ".join(changed))
    for key, value in to_write.items():
        store.write_json(key, value)


def read_bucket_table(store: ArtifactStore, split: str, bucket: str) -> list[dict]:
    import pyarrow.parquet as pq

    from tasks.segment import find_bucket_key

    return pq.read_table(io.BytesIO(store.read_bytes(find_bucket_key(store, split, bucket)))
                         ).to_pylist()


def read_embedding_manifest(store: ArtifactStore, config: Config, clip_identity: dict,
                            bucket: str) -> dict:
    """Read the manifest of a bucket's finished embeddings, checking they match the model."""
    from tasks.clip import features_prefix

    prefix = features_prefix(config.split, config.model, bucket)
    manifest_key = f"{prefix}/manifest.json"
    if not store.exists(manifest_key):
        raise StageError(f"no finished embeddings for bucket {bucket} at {store.url(prefix)}; "
                         f"run extract-clip --split {config.split} --bucket {bucket} "
                         f"--model {config.model} first")
    manifest = store.read_json(manifest_key)
    differing = [k for k, v in clip_identity.items() if manifest.get(k) != v]
    if differing:
        found = ", ".join(f"{k}: {manifest.get(k)!r}" for k in differing)
        expected = ", ".join(f"{k}: {clip_identity[k]!r}" for k in differing)
        raise StageError(f"embeddings of bucket {bucket} were made with other model options "
                         f"({found}) than curate uses ({expected}); pass the same --model, "
                         "--pretrained or --checkpoint as extract-clip")
    return manifest


def collect_candidates(store: ArtifactStore, bucket: str, manifest: dict, rows: list[dict],
                       text, top_size: int, bottom_size: int):
    """Score every embedded sample of a bucket against the prompts, one chunk at a time."""
    import numpy as np

    from tasks.clip import read_chunk
    from tasks.curate_retrieval import CandidateCollector

    row_of = {row["photo_id"]: index for index, row in enumerate(rows)}
    collector = CandidateCollector(text, top_size, bottom_size)
    for chunk in manifest["chunks"]:
        arrays = read_chunk(store, chunk["key"])
        ids = arrays["photo_id"].tolist()
        missing = [photo_id for photo_id in ids if photo_id not in row_of]
        if missing:
            raise StageError(f"embeddings of bucket {bucket} contain photo ids missing from its "
                             f"manifest (e.g. {missing[0]}); re-run extract-clip for it")
        rows_index = np.array([row_of[photo_id] for photo_id in ids], dtype=np.int64)
        collector.add(rows_index, arrays["embedding_normalized"])
    logger.info("bucket %s: scored %d embedded samples against %d prompts", bucket,
                collector.samples, len(text))
    return collector


def curate_bucket(store: ArtifactStore, config: Config, concepts, manifest: dict,
                  text, bucket: str, prefix: str, reader) -> None:
    from tasks.curate_config import BACKGROUND
    from tasks.curate_layout import remove_bucket_leftovers, write_bucket
    from tasks.curate_report import contact_sheet
    from tasks.curate_retrieval import select_background, select_positives

    remove_bucket_leftovers(store, prefix, bucket)
    rows = read_bucket_table(store, config.split, bucket)
    top_size = concepts.class_size if concepts.allow_overlap else concepts.query_size
    bottom_size = concepts.query_size if concepts.background else 0
    collector = collect_candidates(store, bucket, manifest, rows, text, top_size, bottom_size)

    concept_names = [concept.class_name for concept in concepts.concepts]
    positives = select_positives(collector.top, concepts.class_size, concepts.allow_overlap,
                                 concept_names, bucket, config.allow_small_classes,
                                 bucket_size=collector.samples)
    selection = dict(zip(concept_names, positives, strict=True))
    if concepts.background:
        selection[BACKGROUND] = select_background(
            collector.bottom, positives, concepts.class_size, concepts.background_per_concept,
            concept_names, bucket, config.allow_small_classes, bucket_size=collector.samples)

    images = write_bucket(store, prefix, bucket, selection, rows, concepts.class_names,
                          concepts.prompts, reader)
    sheet = contact_sheet(images, concepts.class_names, CONTACT_SHEET_IMAGES,
                          f"{concepts.name} bucket {bucket}")
    store.write_bytes(f"{prefix}/report/contact_sheet_{bucket}.png", sheet)


def run(config: Config) -> dict:
    import tempfile
    from pathlib import Path

    from tasks.clear_layout import dataset_prefix
    from tasks.clip import resolve_device
    from tasks.clip_models import embed_prompts, load_clip
    from tasks.curate_config import load_concept_config
    from tasks.curate_layout import (
        finished_buckets,
        read_bucket_metadata,
        write_dataset_index,
    )
    from tasks.curate_report import counts_csv, format_counts_table
    from tasks.images import ShardReader

    store = ArtifactStore(config.artifact_root)
    concepts = load_concept_config(config.config_path)
    prefix = dataset_prefix(concepts.name)
    buckets = select_buckets(store, config)
    finished = finished_buckets(store, prefix)
    done = set(finished)

    # Everything that can be checked before curating is checked before anything is
    # written. Finished buckets are skipped, so their embeddings are not needed.
    clip = load_clip(config.model, config.pretrained, config.checkpoint,
                     device=resolve_device(config.device))
    clip_identity = clip.identity()
    manifests = {bucket: read_embedding_manifest(store, config, clip_identity, bucket)
                 for bucket in buckets if bucket not in done}
    check_dataset_identity(store, prefix, concepts.raw,
                           {"format": OPTIONS_FORMAT, "split": config.split, **clip_identity},
                           finished)
    store.write_text(f"{prefix}/class_names.txt", "\n".join(concepts.class_names))
    text = embed_prompts(clip.model, clip.tokenizer, concepts.prompts,
                         list(concepts.templates) if concepts.templates else None)

    curated, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="clear-shards-") as cache:
        reader = ShardReader(store, Path(cache))
        for bucket in buckets:
            if bucket in done:
                logger.info("bucket %s of dataset %s is already curated, skipping", bucket,
                            concepts.name)
                skipped.append(bucket)
                continue
            curate_bucket(store, config, concepts, manifests[bucket], text, bucket, prefix,
                          reader)
            logger.info("bucket %s of dataset %s curated", bucket, concepts.name)
            curated.append(bucket)
        reader.close()

    all_buckets = finished_buckets(store, prefix)
    metadata = {bucket: read_bucket_metadata(store, prefix, bucket, concepts.class_names)
                for bucket in all_buckets}
    write_dataset_index(store, prefix, concepts.class_names, metadata)
    counts = {bucket: {name: len(entries) for name, entries in classes.items()}
              for bucket, classes in metadata.items()}
    store.write_text(f"{prefix}/report/counts.csv", counts_csv(counts, concepts.class_names))
    logger.info("dataset %s: images per bucket and class", concepts.name)
    for line in format_counts_table(counts, concepts.class_names):
        logger.info("%s", line)

    return {"dataset": prefix, "name": concepts.name, "split": config.split,
            "model": config.model, "classes": concepts.class_names,
            "buckets_curated": curated, "buckets_skipped": skipped, "counts": counts,
            "images": sum(sum(by_class.values()) for by_class in counts.values())}
