"""extract-clip: embed the images of one bucket with an open_clip model.

Reads `buckets/<split>/bucket-<id>.parquet`, decodes its samples from the shard tars in
DataLoader workers, and writes under `features/<split>/<model-slug>/<bucket>/`:

- `options.json`: the model identity and chunking, written first. A re-run with other
  options into the same folder fails instead of mixing embeddings of two models.
- `chunk-NNNNN.npz`: samples `[N * chunk_size, (N + 1) * chunk_size)` of the bucket, in
  manifest order. Arrays: `photo_id` (int64, n), `embedding` (float32, n x dim, the raw
  image tower output), `embedding_normalized` (float32, n x dim, L2-normalized),
  `failed_photo_id` (int64) and `failed_error` (unicode) for samples that could not be
  read or decoded. A chunk file exists only once complete, so a re-run skips it.
- `manifest.json`: written last, as the commit marker. It contains the model identity,
  the chunk list, the embedded and failed sample counts and each failure.

JPEGs are decoded at a reduced scale when both sides stay at least the model's input
size (Pillow's `Image.draft`, which scales in the DCT by 1/2, 1/4 or 1/8), so the
resize that follows never enlarges an image. This cuts decoding and resizing time for
photos at least twice the input size, and it changes their embeddings slightly against
a full decode. `--no-jpeg-draft` restores the full decode that the original CLEAR code
used, and `options.json` records the choice.

Both embeddings stay float32. Curation ranks whole buckets by cosine score, and float16
storage would add errors near 1e-3, larger than the gaps between neighbouring scores
near the top of a large bucket, so it could reorder the kept images. The cost is
2 x 4 x dim bytes per sample (4 KiB for a 512-dimensional model).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import ConfigError, StageError
from tasks.images import ShardReader, shard_tar_key
from tasks.log import ProgressLogger
from tasks.options import require_minimum
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

OPTIONS_FORMAT = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Log the first decode failure and then every Nth, so a bad shard cannot flood the log.
FAILURE_LOG_EVERY = 100


def features_prefix(split: str, model: str, bucket: str) -> str:
    from tasks.clip_models import model_slug

    return f"features/{split}/{model_slug(model)}/{bucket}"


def chunk_key(prefix: str, index: int) -> str:
    return f"{prefix}/chunk-{index:05d}.npz"


@dataclass(frozen=True)
class Config:
    artifact_root: str
    split: str
    bucket: str
    model: str
    pretrained: str | None = None
    checkpoint: str | None = None
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    chunk_size: int = 8192
    precision: str = "auto"
    max_chunks: int | None = None
    cache_dir: str | None = None
    jpeg_draft: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        from tasks.clip_models import resolve_weights

        require_minimum({"--batch-size": args.batch_size, "--chunk-size": args.chunk_size,
                         "--max-chunks": args.max_chunks})
        if args.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
        pretrained, checkpoint = resolve_weights(args.model, args.pretrained, args.checkpoint)
        return cls(artifact_root=args.artifact_root, split=args.split, bucket=str(args.bucket),
                   model=args.model, pretrained=pretrained, checkpoint=checkpoint,
                   batch_size=args.batch_size, workers=args.workers, device=args.device,
                   chunk_size=args.chunk_size, precision=args.precision,
                   max_chunks=args.max_chunks, cache_dir=args.cache_dir,
                   jpeg_draft=args.jpeg_draft)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="default",
                        help="bucket split written by the segment stage (default: default)")
    parser.add_argument("--bucket", required=True, help="bucket id to embed, e.g. 0")
    parser.add_argument("--model", default="ViT-B/32",
                        help="CLIP model: a CLEAR name (RN50, RN101, RN50x4, ViT-B/32), an "
                        "open_clip architecture, or clear-tiny for tests (default: ViT-B/32)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (default: openai for CLEAR names)")
    parser.add_argument("--checkpoint", default=None,
                        help="state dict file (path, file:// or s3://) instead of a tag")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per forward pass (default: 256)")
    parser.add_argument("--workers", type=int, default=4,
                        help="DataLoader worker processes that read and decode images; "
                        "0 decodes in the main process (default: 4)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs; auto picks cuda when available")
    parser.add_argument("--chunk-size", type=int, default=8192,
                        help="samples per output chunk, the unit of resume (default: 8192)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast precision; auto is bf16 on GPUs that support it, "
                        "else fp16 on GPU and fp32 on CPU (default: auto)")
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="debugging: stop after writing this many chunks in this run, "
                        "leaving the bucket unfinished")
    parser.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction, default=True,
                        help="decode JPEGs at 1/2, 1/4 or 1/8 scale when both sides stay at "
                        "least the model's input size; --no-jpeg-draft decodes at full size "
                        "like the original CLEAR code (default: on)")
    parser.add_argument("--cache-dir", default=None,
                        help="local folder for shard tars fetched from S3 (default: a "
                        "temporary folder)")


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested, but torch finds no CUDA device; "
                          "use --device cpu or auto")
    return requested


def resolve_precision(requested: str, device: str) -> str:
    import torch

    if requested == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and device == "cpu":
        raise ConfigError("--precision fp16 needs --device cuda; use fp32 or bf16 on CPU")
    return requested


def decode_for_model(data: bytes, draft_size: int | None):
    """Decode image bytes into an RGB PIL image with its EXIF orientation applied.

    Does what `tasks.images.decode_image` does, except that with `draft_size` a JPEG is
    decoded at the smallest DCT scale whose width and height are both at least
    `draft_size`. Raises PIL.UnidentifiedImageError or OSError for unreadable bytes.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        if draft_size is not None and image.format == "JPEG":
            # A square request keeps both sides large enough whatever the EXIF rotation.
            image.draft("RGB", (draft_size, draft_size))
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


class BucketImages:
    """Map-style dataset over bucket manifest rows: (photo id, image tensor or None, error)."""

    def __init__(self, rows: list[dict], reader: ShardReader, preprocess,
                 draft_size: int | None = None):
        self.rows = rows
        self.reader = reader
        self.preprocess = preprocess
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        from PIL import Image

        row = self.rows[index]
        try:
            data = self.reader.read(row["shard"], row["offset"], row["bytes"])
            image = decode_for_model(data, self.draft_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            # Pillow raises these for corrupt or truncated files; a truncated shard raises
            # OSError from the reader.
            return row["photo_id"], None, f"{type(error).__name__}: {error}"
        return row["photo_id"], self.preprocess(image), None


def collate_samples(samples):
    """Stack decoded images; keep the failures apart as (photo id, error) pairs."""
    import torch

    ok = [(photo_id, image) for photo_id, image, error in samples if error is None]
    failed = [(photo_id, error) for photo_id, image, error in samples if error is not None]
    ids = torch.tensor([photo_id for photo_id, _ in ok], dtype=torch.int64)
    images = torch.stack([image for _, image in ok]) if ok else None
    return ids, images, failed


def read_bucket_rows(store: ArtifactStore, split: str, bucket: str) -> list[dict]:
    import pyarrow.parquet as pq

    from tasks.segment import find_bucket_key

    key = find_bucket_key(store, split, bucket)
    table = pq.read_table(io.BytesIO(store.read_bytes(key)),
                          columns=["photo_id", "shard", "offset", "bytes"])
    return table.to_pylist()


def photo_ids_digest(rows: list[dict]) -> str:
    ids = np.array([row["photo_id"] for row in rows], dtype=np.int64)
    return hashlib.sha256(ids.tobytes()).hexdigest()


OPTIONS_ADDED_LATER = {"jpeg_draft": False}


def check_options(store: ArtifactStore, prefix: str, options: dict) -> None:
    """Write `options.json`, or fail when the folder was started with other options."""
    key = f"{prefix}/options.json"
    if store.exists(key):
        # Folders written before an option existed were made with its old behaviour.
        existing = {**OPTIONS_ADDED_LATER, **store.read_json(key)}
        if existing != options:
            changed = sorted(k for k in options.keys() | existing.keys()
                             if existing.get(k) != options.get(k))
            if "bucket_photo_ids_sha256" in changed:
                raise StageError(
                    f"the samples of this bucket changed since {store.url(prefix)} was "
                    "embedded (segment ran again over more shards); delete that folder to "
                    "embed the bucket again"
                )
            details = ", ".join(f"{k}: {existing.get(k)!r} -> {options.get(k)!r}"
                                for k in changed)
            raise StageError(f"{store.url(prefix)} already contains embeddings made with other "
                             f"options ({details}); delete that folder or use the same options")
        return
    store.write_json(key, options)


def check_shards_exist(store: ArtifactStore, rows: list[dict]) -> None:
    missing = sorted(s for s in {row["shard"] for row in rows}
                     if not store.exists(shard_tar_key(s)))
    if missing:
        raise StageError(f"shard tars missing for {len(missing)} shard(s) "
                         f"({', '.join(missing[:5])}); run the download stage for them first")


def plan_batches(pending: list[int], total: int, chunk_size: int,
                 batch_size: int) -> list[tuple[int, list[int]]]:
    """(chunk index, row indices) for each batch; no batch spans two chunks."""
    batches = []
    for chunk in pending:
        start, end = chunk * chunk_size, min((chunk + 1) * chunk_size, total)
        for batch_start in range(start, end, batch_size):
            batches.append((chunk, list(range(batch_start, min(batch_start + batch_size, end)))))
    return batches


def write_chunk(store: ArtifactStore, key: str, ids: list, raw: list, failed: list,
                embed_dim: int) -> None:
    import torch

    raw_array = torch.cat(raw).numpy() if raw else np.zeros((0, embed_dim), np.float32)
    norms = np.linalg.norm(raw_array, axis=1, keepdims=True)
    normalized = raw_array / np.maximum(norms, np.finfo(np.float32).tiny)
    with store.staged_file(key) as path, open(path, "wb") as handle:
        np.savez(handle,
                 photo_id=np.concatenate(ids) if ids else np.zeros(0, np.int64),
                 embedding=raw_array.astype(np.float32),
                 embedding_normalized=normalized.astype(np.float32),
                 failed_photo_id=np.array([p for p, _ in failed], dtype=np.int64),
                 failed_error=np.array([e for _, e in failed], dtype=str))


def read_chunk(store: ArtifactStore, key: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.read_bytes(key)), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def embed_pending_chunks(config: Config, store: ArtifactStore, clip, rows: list[dict],
                         prefix: str, pending: list[int], device: str, precision: str,
                         cache_dir: Path) -> list[int]:
    """Embed the pending chunks in order, writing each as soon as it is complete.

    Returns the chunk indices written in this run.
    """
    import torch
    from torch.utils.data import DataLoader

    batches = plan_batches(pending, len(rows), config.chunk_size, config.batch_size)
    reader = ShardReader(store, cache_dir)
    if store.is_s3:
        # Fetch each S3 shard once here, so that DataLoader workers do not race to
        # download the same tar into the cache.
        for shard in sorted({rows[i]["shard"] for _, indices in batches for i in indices}):
            reader.read(shard, 0, 0)
        reader.close()
    # NOTE: decoding stays on the CPU here, in DataLoader workers. Decoding with nvJPEG
    # on the GPU, as benchmarks/clip_gpu.py does, has not been run on a GPU yet, and
    # torchvision 0.29's GPU decoder needs its own CUDA stream to be safe.
    dataset = BucketImages(rows, reader, clip.preprocess,
                           draft_size=clip.image_size if config.jpeg_draft else None)
    loader = DataLoader(dataset, batch_sampler=[indices for _, indices in batches],
                        num_workers=config.workers, collate_fn=collate_samples,
                        pin_memory=device == "cuda",
                        persistent_workers=False)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    progress = ProgressLogger(logger, f"bucket {config.bucket} embedding",
                              sum(len(indices) for _, indices in batches))
    written: list[int] = []
    chunk_ids, chunk_raw, chunk_failed = [], [], []
    failures_logged = 0
    batch_chunks = [chunk for chunk, _ in batches]
    for position, (ids, images, failed) in enumerate(loader):
        chunk = batch_chunks[position]
        for photo_id, error in failed:
            if failures_logged % FAILURE_LOG_EVERY == 0:
                logger.warning("bucket %s: cannot decode photo %d (%s); recording it as failed "
                               "(logging every %dth failure)", config.bucket, photo_id, error,
                               FAILURE_LOG_EVERY)
            failures_logged += 1
        chunk_failed.extend(failed)
        if images is not None:
            images = images.to(device, non_blocking=True)
            with torch.no_grad(), torch.autocast(device_type=device, dtype=autocast_dtype,
                                                 enabled=autocast_dtype is not None):
                features = clip.model.encode_image(images)
            chunk_ids.append(ids.numpy())
            chunk_raw.append(features.float().cpu())
        progress.update(len(ids) + len(failed))

        last_of_chunk = position + 1 == len(batches) or batch_chunks[position + 1] != chunk
        if last_of_chunk:
            write_chunk(store, chunk_key(prefix, chunk), chunk_ids, chunk_raw, chunk_failed,
                        clip.embed_dim)
            logger.info("bucket %s: wrote chunk %d (%d embedded, %d failed)", config.bucket,
                        chunk, sum(len(i) for i in chunk_ids), len(chunk_failed))
            written.append(chunk)
            chunk_ids, chunk_raw, chunk_failed = [], [], []
            if config.max_chunks is not None and len(written) >= config.max_chunks:
                break
    progress.close()
    return written


def write_manifest(store: ArtifactStore, prefix: str, options: dict, chunk_count: int,
                   total: int) -> dict:
    chunks, failed, embedded = [], [], 0
    for index in range(chunk_count):
        key = chunk_key(prefix, index)
        arrays = read_chunk(store, key)
        embedded += len(arrays["photo_id"])
        failed += [{"photo_id": int(p), "error": str(e)}
                   for p, e in zip(arrays["failed_photo_id"], arrays["failed_error"], strict=True)]
        chunks.append({"key": key, "samples": int(len(arrays["photo_id"])),
                       "failed": int(len(arrays["failed_photo_id"]))})
    manifest = {**options, "chunks": chunks, "samples": embedded, "failed_samples": len(failed),
                "failed": failed, "total_samples": total}
    store.write_json(f"{prefix}/manifest.json", manifest)
    return manifest


def run(config: Config) -> dict:
    import tempfile

    from tasks.clip_models import load_clip

    store = ArtifactStore(config.artifact_root)
    prefix = features_prefix(config.split, config.model, config.bucket)
    rows = read_bucket_rows(store, config.split, config.bucket)
    chunk_count = (len(rows) + config.chunk_size - 1) // config.chunk_size

    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    clip = load_clip(config.model, config.pretrained, config.checkpoint, device=device)
    options = {"format": OPTIONS_FORMAT, **clip.identity(), "precision": precision,
               "split": config.split, "bucket": config.bucket, "chunk_size": config.chunk_size,
               "bucket_samples": len(rows), "bucket_photo_ids_sha256": photo_ids_digest(rows),
               "jpeg_draft": config.jpeg_draft}

    manifest_key = f"{prefix}/manifest.json"
    check_options(store, prefix, options)
    if store.exists(manifest_key):
        manifest = store.read_json(manifest_key)
        logger.info("bucket %s already embedded at %s, skipping", config.bucket,
                    store.url(prefix))
        return summarize(config, manifest, prefix, written=[], complete=True)

    pending = [i for i in range(chunk_count) if not store.exists(chunk_key(prefix, i))]
    logger.info("bucket %s: %d samples in %d chunks, %d chunks to embed on %s (%s)",
                config.bucket, len(rows), chunk_count, len(pending), device, precision)
    check_shards_exist(store, [row for i in pending for row in
                               rows[i * config.chunk_size:(i + 1) * config.chunk_size]])
    with tempfile.TemporaryDirectory(prefix="clear-shards-") as tmp:
        cache_dir = Path(config.cache_dir) if config.cache_dir else Path(tmp)
        written = embed_pending_chunks(config, store, clip, rows, prefix, pending, device,
                                       precision, cache_dir)

    if len(written) < len(pending):
        logger.warning("bucket %s: stopped after %d chunk(s) because of --max-chunks; run again "
                       "to finish", config.bucket, len(written))
        return {"split": config.split, "bucket": config.bucket, "model": config.model,
                "features": prefix, "complete": False, "chunks_written": len(written),
                "chunks_total": chunk_count}
    manifest = write_manifest(store, prefix, options, chunk_count, len(rows))
    return summarize(config, manifest, prefix, written, complete=True)


def summarize(config: Config, manifest: dict, prefix: str, written: list[int],
              complete: bool) -> dict:
    return {"split": config.split, "bucket": config.bucket, "model": config.model,
            "features": prefix, "complete": complete, "chunks_written": len(written),
            "chunks_total": len(manifest["chunks"]), "samples": manifest["samples"],
            "failed_samples": manifest["failed_samples"],
            "total_samples": manifest["total_samples"]}
