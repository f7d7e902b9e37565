"""download: fetch the images of one planned shard into a tar and a Parquet manifest.

Reads `shards/plan.json` and the shard's `shards/shard-NNNNN.parquet`, fetches every
sample's download URL concurrently (aiohttp, bounded retries with backoff, Retry-After
honoured, per-host connection limit, cached DNS), validates each body with Pillow and
writes:

- `images/shard-NNNNN.tar`: members `<photo_id>.<ext>` holding the original bytes of
  valid images, where `<ext>` follows the detected format (a PNG served under a .jpg
  URL becomes `<photo_id>.png`);
- `images/shard-NNNNN.parquet`: one row per sample with its status and, for `ok`
  samples, size, EXIF orientation, sha256 and the member's data offset in the tar;
- `images/shard-NNNNN.stats.json`: counts per status and timing, written last. It
  marks the shard as done, so re-running a finished shard does nothing.

Statuses: ok, http_error, timeout, connection_error, truncated, too_large,
invalid_url, unavailable (Flickr's "photo unavailable" placeholder), empty, too_small,
not_image, invalid_image, too_many_pixels, filtered_min_edge, filtered_aspect_ratio.
A failed sample is a row with its status and error, never a failed shard.

Image modes: CMYK, palette, grayscale and images with alpha are kept as downloaded.
Readers convert to RGB with `tasks.images.decode_image`, which also applies the EXIF
orientation. Width and height in the manifest are the displayed size, after that
orientation.

Sources: `--source http` (the default) fetches the download URLs, optionally through
`--mirror-base-url`. `s3-mirror` reads the S3 copy keyed by the hash column, and
`http-then-s3-mirror` tries that copy for samples whose URL failed.

Resume: progress goes to working files (see `tasks.download.writer`), next to the
outputs for local artifact roots and under `--work-dir` for S3 roots. A killed run,
re-run with the same options, fetches only the samples it has not recorded yet.

Retry: `--retry-failed` on a finished shard fetches again only the samples whose status
may be transient (timeout, connection_error, truncated, HTTP 408/425/429/500/502/503/504)
and keeps every other row. The new tar starts with the old tar's members at their old
offsets and appends the newly fetched ones, then replaces the old tar, manifest and
stats in that order. Each replace is atomic (a rename locally, an upload on S3 that
becomes visible whole), and a reader holding the old manifest still finds its members
at the same offsets in the new tar.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import logging
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tasks.download.fetch import RETRYABLE_HTTP_STATUSES, RETRYABLE_STATUSES, Fetcher, FetchSettings
from tasks.download.s3source import DEFAULT_S3_MIRROR, S3MirrorFetcher
from tasks.download.sources import Checker, Sources, fetch_sample
from tasks.download.validate import KNOWN_PLACEHOLDER_SHA256, Limits
from tasks.download.writer import ShardWriter, padded_size, write_manifest
from tasks.errors import ConfigError, StageError
from tasks.images import shard_manifest_key, shard_stats_key, shard_tar_key
from tasks.log import ProgressLogger
from tasks.options import require_minimum
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

PLAN_KEY = "shards/plan.json"
STATS_FORMAT = 1
# Pillow's own default decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, Pillow 13).
DEFAULT_MAX_PIXELS = 89_478_485
# Failures of one status logged at WARNING: the first few, then every Nth.
LOG_FIRST_FAILURES = 3
LOG_EVERY_FAILURES = 1000
SOURCES = ("http", "s3-mirror", "http-then-s3-mirror")


@dataclass(frozen=True)
class Config:
    artifact_root: str
    shard: str
    concurrency: int = 64
    per_host: int = 16
    timeout: float = 10.0
    retries: int = 3
    backoff_base: float = 1.0
    max_requests_per_second: float | None = None
    mirror_base_url: str | None = None
    min_size: int = 1024
    min_edge: int = 64
    max_aspect_ratio: float = 4.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 32 << 20
    placeholder_sha256: tuple[str, ...] = ()
    work_dir: str | None = None
    source: str = "http"
    s3_mirror_uri: str = DEFAULT_S3_MIRROR
    retry_failed: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if not re.fullmatch(r"\d{5,}", args.shard):
            raise ConfigError(f"--shard {args.shard!r} is invalid: pass a five-digit shard "
                              "id from shards/plan.json, such as 00000")
        require_minimum({"--concurrency": args.concurrency, "--per-host": args.per_host,
                         "--max-pixels": args.max_pixels, "--max-bytes": args.max_bytes})
        require_minimum({"--retries": args.retries, "--min-size": args.min_size,
                         "--min-edge": args.min_edge}, minimum=0)
        if not args.timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got "
                              f"{args.timeout}")
        if args.backoff_base < 0:
            raise ConfigError(f"--backoff-base must be zero or more seconds, got "
                              f"{args.backoff_base}")
        rate = args.max_requests_per_second or None  # 0, as the DAG may pass, means none
        if rate is not None and not 0 < rate < float("inf"):
            raise ConfigError(f"--max-requests-per-second must be a positive number, got "
                              f"{args.max_requests_per_second}")
        if not args.max_aspect_ratio >= 1:
            raise ConfigError(f"--max-aspect-ratio must be at least 1 (a square image), got "
                              f"{args.max_aspect_ratio}")
        mirror = args.mirror_base_url or None  # an empty value, as the DAG passes, means none
        if mirror is not None:
            parts = urlsplit(mirror)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"--mirror-base-url {mirror!r} is invalid: pass an http:// "
                                  "or https:// URL such as http://127.0.0.1:8000")
            mirror = mirror.rstrip("/")
        if not args.s3_mirror_uri.startswith("s3://") or len(args.s3_mirror_uri) <= 5:
            raise ConfigError(f"--s3-mirror-uri {args.s3_mirror_uri!r} is invalid: pass "
                              "s3://bucket or s3://bucket/prefix")
        placeholders = tuple(value.lower() for value in args.placeholder_sha256)
        for digest in placeholders:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ConfigError(f"--placeholder-sha256 {digest!r} is invalid: pass a "
                                  "64-digit hexadecimal sha256 digest")
        return cls(
            artifact_root=args.artifact_root, shard=args.shard,
            concurrency=args.concurrency, per_host=args.per_host, timeout=args.timeout,
            retries=args.retries, backoff_base=args.backoff_base,
            max_requests_per_second=rate, mirror_base_url=mirror,
            min_size=args.min_size, min_edge=args.min_edge,
            max_aspect_ratio=args.max_aspect_ratio, max_pixels=args.max_pixels,
            max_bytes=args.max_bytes, placeholder_sha256=placeholders,
            work_dir=args.work_dir, source=args.source,
            s3_mirror_uri=args.s3_mirror_uri.rstrip("/"), retry_failed=args.retry_failed,
        )

    def output_options(self) -> dict:
        """The options that decide which samples are kept; resumes must match them.

        Where the bytes come from (mirror URL, S3 copy) is left out: every source serves
        the same photo, and each manifest row records the URL actually fetched, so a
        mirror on a new port does not invalidate finished work.
        """
        return {"min_size": self.min_size, "min_edge": self.min_edge,
                "max_aspect_ratio": self.max_aspect_ratio, "max_pixels": self.max_pixels,
                "max_bytes": self.max_bytes,
                "placeholder_sha256": sorted(self.placeholder_sha256)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Config("", "")
    parser.add_argument("--shard", required=True,
                        help="id of the shard to download, as listed in shards/plan.json "
                        "(five digits, such as 00000)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency,
                        help=f"requests in flight at once (default: {defaults.concurrency})")
    parser.add_argument("--per-host", type=int, default=defaults.per_host,
                        help="open connections per host; with --mirror-base-url every "
                        f"request goes to one host (default: {defaults.per_host})")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds allowed to connect, and between two reads of one "
                        f"response (default: {defaults.timeout:g})")
    parser.add_argument("--retries", type=int, default=defaults.retries,
                        help="extra attempts after a timeout, connection error, truncated "
                        f"body or HTTP 408/425/429/5xx (default: {defaults.retries})")
    parser.add_argument("--max-requests-per-second", type=float, default=None,
                        help="start at most this many requests per second in this shard, "
                        "retries included; with N shards downloading at once the total is N "
                        "times this (default: no limit)")
    parser.add_argument("--backoff-base", type=float, default=defaults.backoff_base,
                        help="seconds before the first retry, doubled per attempt with "
                        "jitter; a Retry-After header takes precedence "
                        f"(default: {defaults.backoff_base:g})")
    parser.add_argument("--mirror-base-url", default=None,
                        help="fetch http://HOST/PATH from MIRROR/HOST/PATH instead, such as "
                        "a local sample mirror (default: fetch the original URLs)")
    parser.add_argument("--source", choices=SOURCES, default=defaults.source,
                        help="where images come from: the download URLs (http), the S3 copy "
                        "keyed by the hash column (s3-mirror), or the URLs with the S3 copy "
                        "for samples whose URL fails (default: http)")
    parser.add_argument("--s3-mirror-uri", default=defaults.s3_mirror_uri,
                        help="bucket and prefix of the S3 copy in the multimedia-commons layout "
                        "data/images/<h[:3]>/<h[3:6]>/<h>.jpg; the endpoint comes from "
                        f"AWS_ENDPOINT_URL (default: {defaults.s3_mirror_uri})")
    parser.add_argument("--min-size", type=int, default=defaults.min_size,
                        help="bodies smaller than this many bytes are rejected as too_small "
                        f"(default: {defaults.min_size})")
    parser.add_argument("--min-edge", type=int, default=defaults.min_edge,
                        help="images whose shorter side has fewer pixels are rejected as "
                        f"filtered_min_edge (default: {defaults.min_edge})")
    parser.add_argument("--max-aspect-ratio", type=float, default=defaults.max_aspect_ratio,
                        help="images whose longer side divided by the shorter side exceeds "
                        "this are rejected as filtered_aspect_ratio "
                        f"(default: {defaults.max_aspect_ratio:g})")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="images with more pixels (width x height, read from the header "
                        "before decoding) are rejected as too_many_pixels "
                        f"(default: {defaults.max_pixels}, Pillow's own limit)")
    parser.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                        help="bodies larger than this many bytes are abandoned as too_large "
                        f"(default: {defaults.max_bytes}, 32 MiB)")
    parser.add_argument("--placeholder-sha256", action="append", default=[],
                        help="sha256 of a placeholder image to record as unavailable; "
                        "repeatable (default: none beyond the built-in list)")
    parser.add_argument("--work-dir", default=None,
                        help="local folder for the working tar and progress record; keep it "
                        "between runs to resume (default: the images/ folder of a local "
                        "artifact root, or a folder under the system temporary folder for "
                        "S3 roots)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="for a finished shard, fetch again the samples that failed with "
                        "a timeout, connection error, truncated body or HTTP "
                        "408/425/429/500/502/503/504, "
                        "keep all other samples, and publish a new tar and manifest; for an "
                        "unfinished shard, download it as usual (default: off, a finished "
                        "shard is left as it is)")


def run(config: Config) -> dict:
    store = ArtifactStore(config.artifact_root)
    started = time.monotonic()

    if config.retry_failed and store.exists(shard_stats_key(config.shard)):
        return retry_failed(store, config, started)
    finished = finished_summary(store, config)
    if finished is not None:
        return finished

    samples = read_shard_samples(store, config.shard)
    with ShardWriter(work_dir_for(store, config), config.shard,
                     config.output_options()) as writer:
        done = writer.done_ids
        pending = [sample for sample in samples if sample["photo_id"] not in done]
        logger.info("shard %s: %d samples, %d already recorded, %d to fetch",
                    config.shard, len(samples), len(samples) - len(pending), len(pending))
        asyncio.run(download_samples(pending, config, writer))
        stats = publish_shard(store, config, writer, samples, time.monotonic() - started)
        writer.discard()
    if stats["samples"] and not stats["counts"].get("ok"):
        logger.warning("shard %s: no sample was downloaded (%s); check the network and "
                       "--mirror-base-url, then rerun with --retry-failed", config.shard,
                       format_counts(stats["counts"]))

    return {"shard": config.shard, "skipped": False, "samples": stats["samples"],
            "ok": stats["counts"].get("ok", 0), "resumed": stats["resumed"], "retried": 0}


def is_retryable_row(row: dict) -> bool:
    """Return True when a manifest row failed in a way that another attempt may fix."""
    if row["status"] == "http_error":
        return row["http_status"] in RETRYABLE_HTTP_STATUSES
    return row["status"] in RETRYABLE_STATUSES


def retry_failed(store: ArtifactStore, config: Config, started: float) -> dict:
    """Fetch again the retryable samples of a finished shard and republish it."""
    import pyarrow.parquet as pq

    stats = read_finished_stats(store, config)
    samples = read_shard_samples(store, config.shard)
    with store.local_copy(shard_manifest_key(config.shard)) as manifest_path:
        manifest_digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        rows = pq.read_table(manifest_path).to_pylist()
    retry_ids = {row["photo_id"] for row in rows if is_retryable_row(row)}
    if not retry_ids:
        logger.info("shard %s: no samples with a retryable status; nothing to do",
                    config.shard)
        return {"shard": config.shard, "skipped": True, "samples": stats["samples"],
                "ok": stats["counts"].get("ok", 0), "resumed": 0, "retried": 0}

    kept_rows = [row for row in rows if row["photo_id"] not in retry_ids]
    tar_end = max((row["offset"] + padded_size(row["bytes"]) for row in kept_rows
                   if row["status"] == "ok"), default=0)
    # The working copy belongs to this manifest: one left by a retry of an older
    # manifest is discarded rather than mixed in.
    options = {**config.output_options(), "retry_of_manifest_sha256": manifest_digest}
    with ShardWriter(work_dir_for(store, config), config.shard, options, purpose="retry",
                     restart_on_other_options=True) as writer:
        if not writer.rows:
            with store.local_copy(shard_tar_key(config.shard)) as tar_path:
                writer.seed(kept_rows, tar_path, tar_end)
        done = writer.done_ids
        pending = [sample for sample in samples if sample["photo_id"] not in done]
        logger.info("shard %s: retrying %d samples with a retryable status, keeping %d",
                    config.shard, len(pending), len(samples) - len(pending))
        asyncio.run(download_samples(pending, config, writer))
        stats = publish_shard(store, config, writer, samples, time.monotonic() - started,
                              retried=len(retry_ids))
        writer.discard()

    return {"shard": config.shard, "skipped": False, "samples": stats["samples"],
            "ok": stats["counts"].get("ok", 0), "resumed": stats["resumed"],
            "retried": len(retry_ids)}


def format_counts(counts: dict) -> str:
    """Return status counts as `status: n` pairs, largest first."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{status}: {count}" for status, count in ordered)


def finished_summary(store: ArtifactStore, config: Config) -> dict | None:
    """Return the summary of an already finished shard, or None when it still needs work."""
    if not store.exists(shard_stats_key(config.shard)):
        return None
    stats = read_finished_stats(store, config)
    logger.info("shard %s is already downloaded (%s); nothing to do",
                config.shard, store.url(shard_stats_key(config.shard)))
    failed = stats["samples"] - stats["counts"].get("ok", 0)
    if failed:
        logger.warning("shard %s: %d of %d samples failed (%s); rerun with --retry-failed "
                       "to fetch the retryable ones again", config.shard, failed,
                       stats["samples"], format_counts(stats["counts"]))
    return {"shard": config.shard, "skipped": True, "samples": stats["samples"],
            "ok": stats["counts"].get("ok", 0), "resumed": 0, "retried": 0}


def read_finished_stats(store: ArtifactStore, config: Config) -> dict:
    """Read a finished shard's stats, raising StageError when its options differ."""
    stats = store.read_json(shard_stats_key(config.shard))
    if stats.get("options") != config.output_options():
        raise StageError(
            f"shard {config.shard} was downloaded with options {stats.get('options')}, which "
            f"differ from {config.output_options()}; rerun with the same options, or delete "
            f"{store.url('images/shard-' + config.shard)}.* to download it again"
        )
    return stats


def read_shard_samples(store: ArtifactStore, shard_id: str) -> list[dict]:
    """Read the shard's planned samples, one per photo id: photo_id, hash, download_url,
    extension."""
    import pyarrow.parquet as pq

    plan = store.read_json(PLAN_KEY)
    entries = {entry["id"]: entry for entry in plan.get("shards", [])}
    if shard_id not in entries:
        known = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"shard {shard_id} is not in {store.url(PLAN_KEY)} (it lists "
                          f"{len(entries)} shards: {known or 'none'}); pass one of them "
                          "to --shard or rerun plan-shards")
    key = entries[shard_id]["key"]
    with store.local_copy(key) as path:
        table = pq.read_table(path, columns=["photo_id", "hash", "download_url", "extension"])

    samples = []
    seen = set()
    for row in table.to_pylist():
        if row["photo_id"] in seen:
            logger.warning("shard %s: photo %s is listed twice; fetching it once",
                           shard_id, row["photo_id"])
            continue
        seen.add(row["photo_id"])
        samples.append(row)
    return samples


def work_dir_for(store: ArtifactStore, config: Config) -> Path:
    if config.work_dir:
        return Path(config.work_dir).expanduser()
    if not store.is_s3:
        return store.path / "images"
    root_digest = hashlib.sha256(store.root.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "clear-download" / root_digest


class _FailureLog:
    """Logs sample failures per status: the first few, then every Nth."""

    def __init__(self, shard_id: str):
        self.shard_id = shard_id
        self.counts: Counter[str] = Counter()

    def add(self, photo_id: int, status: str, error: str | None) -> None:
        self.counts[status] += 1
        count = self.counts[status]
        if count <= LOG_FIRST_FAILURES or count % LOG_EVERY_FAILURES == 0:
            logger.warning("shard %s: photo %s %s (%s; %d %s so far)",
                           self.shard_id, photo_id, status, error, count, status)


async def download_samples(samples: list[dict], config: Config, writer: ShardWriter) -> None:
    """Fetch, check and record `samples` with `config.concurrency` workers."""
    settings = FetchSettings(config.concurrency, config.per_host, config.timeout,
                             config.retries, config.backoff_base, config.max_bytes,
                             config.max_requests_per_second)
    limits = Limits(config.min_size, config.min_edge, config.max_aspect_ratio,
                    config.max_pixels,
                    KNOWN_PLACEHOLDER_SHA256 | frozenset(config.placeholder_sha256))
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for sample in samples:
        queue.put_nowait(sample)
    progress = ProgressLogger(logger, f"shard {config.shard}", len(samples))
    failures = _FailureLog(config.shard)
    s3_fetcher = None
    if config.source != "http":
        s3_fetcher = S3MirrorFetcher(config.s3_mirror_uri, config.concurrency, config.max_bytes)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as executor:
            async with Fetcher(settings) as fetcher:
                sources = Sources(config, fetcher, s3_fetcher)
                checker = Checker(limits, executor)

                async def worker() -> None:
                    while True:
                        try:
                            sample = queue.get_nowait()
                        except asyncio.QueueEmpty:
                            return
                        row, data = await fetch_sample(sample, sources, checker)
                        writer.add(row, data)
                        if row["status"] != "ok":
                            failures.add(row["photo_id"], row["status"], row["error"])
                        progress.update()

                workers = min(config.concurrency, max(len(samples), 1))
                await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        if s3_fetcher is not None:
            s3_fetcher.close()
    progress.close()


def publish_shard(store: ArtifactStore, config: Config, writer: ShardWriter,
                  samples: list[dict], duration: float, retried: int = 0) -> dict:
    """Publish tar, manifest and, last, stats; return the stats.

    `retried` is the number of failed samples a --retry-failed run fetched again.
    """
    order = {sample["photo_id"]: index for index, sample in enumerate(samples)}
    rows = sorted(writer.rows, key=lambda row: order.get(row["photo_id"], len(order)))
    tar_path = writer.finish()

    store.put_file(tar_path, shard_tar_key(config.shard))
    with store.staged_file(shard_manifest_key(config.shard)) as manifest_path:
        write_manifest(rows, manifest_path)

    counts = Counter(row["status"] for row in rows)
    stats = {
        "format": STATS_FORMAT, "shard": config.shard, "samples": len(rows),
        "counts": dict(sorted(counts.items())), "resumed": writer.resumed,
        "fetched": len(rows) - writer.resumed, "retried_failed": retried,
        "ok_bytes": sum(row["bytes"] for row in rows if row["status"] == "ok"),
        "duration_seconds": round(duration, 3),
        "samples_per_second": round((len(rows) - writer.resumed) / max(duration, 1e-9), 2),
        "options": config.output_options(),
        "settings": {name: value for name, value in asdict(config).items()
                     if name in ("concurrency", "per_host", "timeout", "retries",
                                 "backoff_base", "max_requests_per_second",
                                 "mirror_base_url", "source",
                                 "s3_mirror_uri")},
    }
    store.write_json(shard_stats_key(config.shard), stats)
    logger.info("shard %s published: %d samples, %s", config.shard, len(rows),
                ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))
    return stats
