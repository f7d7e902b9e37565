"""sync-metadata: convert YFCC100M `yfcc100m_dataset` files into typed Parquet parts.

Reads either layout of the dataset from local paths or s3:// URIs, plain or compressed
(.bz2, .gz, detected from the name):

- the 25-column layout (line number, photo id, hash, ..., marker), usually one file;
- the older 23-column layout without line number and hash, split over ten files
  given in order with `--source`, with the side files `--lines` (line, id) and
  `--hash` (id, hash).

`--autotags` joins `yfcc100m_autotags` (id, `concept:score,...`) to either layout.
Side files are joined by line order and every joined line must carry the same photo
id in every file. S3 sources are downloaded with resumable ranged GETs into a cache
folder and checked against their size and ETag.

The stage streams the files in blocks and writes `metadata/<version>/part-NNNNN.parquet`
plus `metadata/manifest.json`. The manifest is written last and is the commit marker:
readers list parts only through it, so a re-conversion never exposes a mix of old
and new parts. Malformed lines go to `metadata/<version>/rejects.jsonl` with their
file, line number and reason; the stage fails when their fraction exceeds
`--max-reject-fraction`. Re-running against unchanged sources does nothing; for S3
sources that check needs only a HEAD request per file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ConfigError, StageError
from tasks.metadata_convert import DATASET_COLUMNS, OLD_DATASET_COLUMNS, output_schema
from tasks.metadata_join import Input, convert
from tasks.metadata_transfer import (
    DECODERS,
    DEFAULT_RANGE_BYTES,
    default_cache_dir,
    fetch_s3_object,
    head_s3_object,
    open_decompressed,
    remove_cached,
)
from tasks.options import require_minimum
from tasks.storage import ArtifactStore, is_s3_uri, open_input

__all__ = ["DATASET_COLUMNS", "MANIFEST_KEY", "Config", "add_arguments", "load_metadata",
           "output_schema", "run"]

logger = logging.getLogger(__name__)

MANIFEST_KEY = "metadata/manifest.json"
# 2: several sources and side files, and the autotags column.
MANIFEST_FORMAT = 2
SIDE_ROLES = ("lines", "hash", "autotags")


def split_sources(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Split comma-separated source URIs; a sequence is split item by item."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(part.strip() for item in items for part in item.split(",") if part.strip())


@dataclass(frozen=True)
class Config:
    artifact_root: str
    # One URI, a comma-separated list or a sequence of URIs, in line order.
    source: str | tuple[str, ...]
    part_rows: int = 1_000_000
    block_bytes: int = 16 << 20
    max_reject_fraction: float = 0.01
    lines: str | None = None
    hash: str | None = None
    autotags: str | None = None
    cache_dir: str | None = None
    decoder: str = "auto"
    range_bytes: int = DEFAULT_RANGE_BYTES

    @property
    def sources(self) -> tuple[str, ...]:
        return split_sources(self.source)

    @property
    def old_layout(self) -> bool:
        return self.lines is not None or self.hash is not None

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def inputs(self) -> list[tuple[str, str]]:
        """Return (role, URI) of every input file: dataset files first, then side files."""
        if not self.sources:
            raise ConfigError("--source is empty; pass at least one yfcc100m_dataset file")
        if self.old_layout and (self.lines is None or self.hash is None):
            raise ConfigError("the 23-column layout needs both --lines and --hash; pass "
                              "both side files, or neither for the 25-column layout")
        roles = [("dataset", uri) for uri in self.sources]
        return roles + [(role, getattr(self, role)) for role in SIDE_ROLES
                        if getattr(self, role) is not None]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        require_minimum({"--part-rows": args.part_rows, "--block-mib": args.block_mib,
                         "--range-mib": args.range_mib})
        if not 0.0 <= args.max_reject_fraction <= 1.0:
            raise ConfigError(
                f"--max-reject-fraction must be between 0 and 1, got {args.max_reject_fraction}"
            )
        return cls(args.artifact_root, split_sources(args.source), args.part_rows,
                   args.block_mib << 20, args.max_reject_fraction, args.lines, args.hash,
                   args.autotags, args.cache_dir, args.decoder, args.range_mib << 20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, action="append",
                        help="yfcc100m_dataset file: local path, file:// or s3:// URI; plain, "
                        ".bz2 or .gz. Repeat it or pass a comma-separated list for the ten "
                        "files of the 23-column layout, in line order")
    parser.add_argument("--lines", help="yfcc100m_lines side file (line number, photo id); "
                        "selects the 23-column layout and needs --hash")
    parser.add_argument("--hash", help="yfcc100m_hash side file (photo id, MD5 of the "
                        "download URL); selects the 23-column layout and needs --lines")
    parser.add_argument("--autotags", help="yfcc100m_autotags or yfcc100m_autotags-v1 side "
                        "file (photo id, concept:score,...), for either layout")
    parser.add_argument("--part-rows", type=int, default=1_000_000,
                        help="maximum rows per Parquet part (default: 1000000)")
    parser.add_argument("--block-mib", type=int, default=16,
                        help="CSV reader block size in MiB; bounds memory (default: 16)")
    parser.add_argument("--max-reject-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of lines is malformed "
                        "(default: 0.01)")
    parser.add_argument("--cache-dir", help="folder for resumable downloads of s3:// "
                        "sources (default: $CLEAR_CACHE_DIR, else ~/.cache/clear-pipeline)")
    parser.add_argument("--range-mib", type=int, default=DEFAULT_RANGE_BYTES >> 20,
                        help="size of one ranged GET of an s3:// source in MiB (default: 64)")
    parser.add_argument("--decoder", choices=DECODERS, default="auto",
                        help="bzip2 decoder: rapidgzip decodes on all cores, pyarrow on one; "
                        "auto uses rapidgzip for .bz2 files of 8 MiB or more on 4 or more "
                        "cores when it is installed (default: auto). .gz files always use "
                        "pyarrow")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(role: str, uri: str) -> dict:
    """Identify one input: size and ETag from a HEAD for S3, size and mtime locally.

    The SHA-256 of a local file is added by `_add_checksums`, which costs a full read.
    """
    if is_s3_uri(uri):
        return {"role": role, **head_s3_object(uri)}
    with open_input(uri) as path:
        status = path.stat()
        return {"role": role, "uri": uri, "bytes": status.st_size,
                "mtime_ns": status.st_mtime_ns}


def _add_checksums(identities: list[dict]) -> list[dict]:
    """Return `identities` with the SHA-256 of every local file."""
    checked = []
    for identity in identities:
        if is_s3_uri(identity["uri"]):
            checked.append(identity)
            continue
        with open_input(identity["uri"]) as path:
            checked.append({**identity, "sha256": _file_sha256(path)})
    return checked


def _without(identities: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in identity.items() if k != key} for identity in identities]


def _unchanged(previous: dict | None, identities: list[dict], options: dict) -> bool:
    """Check whether the committed metadata was made from these sources and options.

    Equal sizes and mtimes mean unchanged. When only mtimes differ, the files are hashed
    and compared by SHA-256, so a touched but identical file is still a no-op.
    """
    if not previous or previous["options"] != options:
        return False
    before = previous.get("sources") or []
    if _without(before, "sha256") == identities:
        return True
    if _without(_without(before, "sha256"), "mtime_ns") != _without(identities, "mtime_ns"):
        return False
    return _without(_add_checksums(identities), "mtime_ns") == _without(before, "mtime_ns")


def _first_line_columns(path: Path) -> int | None:
    """Count the tab-separated columns of the first line; None when it cannot be read."""
    import pyarrow as pa

    try:
        with open_decompressed(path, "pyarrow") as stream:
            head = stream.read(1 << 20)
    except (pa.ArrowInvalid, OSError):
        return None  # the conversion reports the error with its context
    if not head:
        return None
    return head.split(b"\n", 1)[0].count(b"\t") + 1


def _check_layout(source: Input, old_layout: bool) -> None:
    columns = _first_line_columns(source.path)
    if columns == len(OLD_DATASET_COLUMNS) and not old_layout:
        raise StageError(f"{source.uri!r} has {columns} columns, the older layout without line "
                         "number and hash; pass its side files with --lines and --hash")
    if columns == len(DATASET_COLUMNS) and old_layout:
        raise StageError(f"{source.uri!r} has {columns} columns, the layout with line number "
                         "and hash; pass it without --lines and --hash")


def run(config: Config) -> dict:
    store = ArtifactStore(config.artifact_root)
    store.ensure_writable()

    identities = [_describe(role, uri) for role, uri in config.inputs()]
    options = {"part_rows": config.part_rows, "format": MANIFEST_FORMAT,
               "layout": 23 if config.old_layout else 25}
    previous = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else None
    if _unchanged(previous, identities, options):
        logger.info("metadata is up to date with %d source files; nothing to do",
                    len(identities))
        return {"rows": previous["rows"], "changed": False, "manifest": MANIFEST_KEY}
    # Local files are hashed in a thread while the conversion reads them.
    hashing = ThreadPoolExecutor(1, "source-sha256")
    checksums = hashing.submit(_add_checksums, identities)
    hashing.shutdown(wait=False)

    version = "v-" + hashlib.sha256(json.dumps([identities, options]).encode()).hexdigest()[:12]
    downloads = []
    with contextlib.ExitStack() as stack:
        inputs: list[tuple[str, Input]] = []
        for identity in identities:
            uri = identity["uri"]
            if is_s3_uri(uri):
                path, check = fetch_s3_object(uri, identity, config.cache_path,
                                              range_bytes=config.range_bytes)
                downloads.append({"uri": uri, **check})
            else:
                path = stack.enter_context(open_input(uri))
            inputs.append((identity["role"], Input(uri, path)))
        datasets = [source for role, source in inputs if role == "dataset"]
        sides = {role: source for role, source in inputs if role != "dataset"}
        for source in datasets:
            _check_layout(source, config.old_layout)

        total_bytes = sum(identity["bytes"] for identity in identities)
        logger.info("converting %d files (%d bytes) into %s", len(inputs), total_bytes,
                    store.url(f"metadata/{version}"))
        store.delete_prefix(f"metadata/{version}/")
        result = convert(datasets, sides, config.old_layout, store, version, config)

    total = result["rows"] + result["rejected"]
    fraction = result["rejected"] / max(total, 1)
    if fraction > config.max_reject_fraction:
        raise StageError(
            f"{result['rejected']} of {total} lines in {', '.join(config.sources)} are "
            f"malformed ({fraction:.2%} > --max-reject-fraction {config.max_reject_fraction}); "
            f"see {store.url(result['rejects'])}, fix the source or raise the limit"
        )

    manifest = {"format": MANIFEST_FORMAT, "sources": checksums.result(), "options": options,
                "version": version, "downloads": downloads, **result}
    store.write_json(MANIFEST_KEY, manifest)
    if previous and previous.get("version") != version:
        store.delete_prefix(f"metadata/{previous['version']}/")
    for download in downloads:
        remove_cached(download["uri"], config.cache_path)
    logger.info("wrote %d rows in %d parts, rejected %d lines", result["rows"],
                len(result["parts"]), result["rejected"])
    return {"rows": result["rows"], "rejected": result["rejected"], "changed": True,
            "manifest": MANIFEST_KEY}


def load_metadata(store: ArtifactStore, columns: list[str] | None = None):
    """Read the committed metadata parts as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not store.exists(MANIFEST_KEY):
        raise StageError(f"no metadata under {store.root!r}: run sync-metadata first")
    manifest = store.read_json(MANIFEST_KEY)
    tables = []
    for part in manifest["parts"]:
        with store.local_copy(part["key"]) as path:
            tables.append(pq.read_table(path, columns=columns))
    if not tables:
        return output_schema().empty_table() if columns is None else \
            pa.schema([output_schema().field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)
