"""segment: order the downloaded samples by upload time and split them into time buckets.

Only samples whose download status is `ok` take part. Samples are ordered by upload
time, then metadata line number, then photo id, so the order and every bucket is
deterministic. Three modes, as in CLEAR:

- `year`: one bucket per calendar year of upload, `--years 2004-2014` by default
  (CLEAR's range), bucket ids 0, 1, ... in year order;
- `equal`: `--buckets N` buckets of equal size (the first ones hold one sample more
  when the count does not divide);
- `ranges`: `--ranges-file`, a JSON list of `{"start": ..., "end": ...}` upload times
  in CLEAR's format (`"2004-01-01 11:52:13.0"`, read as UTC), both ends inclusive.

Writes `buckets/<split>/bucket-<id>.parquet` and then `buckets/<split>/summary.json`
(the commit marker) with per-bucket counts, first and last upload time and line-number
range. A split is tied to its options: re-running a split name with other options is
rejected instead of overwriting it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from tasks.errors import ConfigError, StageError
from tasks.images import shard_manifest_key, shard_stats_key
from tasks.options import parse_year_range, require_minimum, validate_name
from tasks.shards import PLAN_KEY, shard_key
from tasks.storage import ArtifactStore, open_input

logger = logging.getLogger(__name__)

MODES = ("year", "equal", "ranges")
TIME_FORMATS = ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


def summary_key(split: str) -> str:
    return f"buckets/{split}/summary.json"


def bucket_key(split: str, version: str, bucket: str) -> str:
    return f"buckets/{split}/{version}/bucket-{bucket}.parquet"


def find_bucket_key(store: ArtifactStore, split: str, bucket: str) -> str:
    """Look up the manifest key of `bucket` in the split's committed summary."""
    key = summary_key(split)
    if not store.exists(key):
        raise StageError(f"split {split!r} not found at {store.url(key)}: run segment first")
    entries = {entry["id"]: entry for entry in store.read_json(key)["buckets"]}
    if bucket not in entries:
        raise StageError(f"bucket {bucket!r} not found in split {split!r}; valid buckets: "
                         f"{', '.join(entries) or 'none'}")
    return entries[bucket]["key"]


def parse_time(text: str) -> datetime:
    for time_format in TIME_FORMATS:
        try:
            return datetime.strptime(text, time_format).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise ConfigError(f"invalid time {text!r} in the ranges file: expected "
                      "'YYYY-MM-DD HH:MM:SS.f' as in CLEAR's time-split files")


def parse_ranges(text: str, source: str) -> list[tuple[datetime, datetime]]:
    """Parse and check CLEAR's list of `{"start", "end"}` ranges: ordered, no overlap."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"ranges file {source!r} is not valid JSON ({error})") from error
    if not isinstance(items, list) or not items:
        raise ConfigError(f"ranges file {source!r} must hold a non-empty JSON list of "
                          '{"start": ..., "end": ...} objects')
    ranges = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "start" not in item or "end" not in item:
            raise ConfigError(f"range {index} in {source!r} must be an object with "
                              f"'start' and 'end', got {item!r}")
        start, end = parse_time(str(item["start"])), parse_time(str(item["end"]))
        if end < start:
            raise ConfigError(f"range {index} in {source!r} ends ({item['end']}) before it "
                              f"starts ({item['start']})")
        if ranges and start <= ranges[-1][1]:
            raise ConfigError(f"range {index} in {source!r} starts at {item['start']}, not "
                              f"after the end of range {index - 1}; ranges must be in time "
                              "order and must not overlap")
        ranges.append((start, end))
    return ranges


@dataclass(frozen=True)
class Config:
    artifact_root: str
    split: str = "default"
    mode: str = "year"
    buckets: int = 11
    first_year: int = 2004
    last_year: int = 2014
    ranges: tuple[tuple[str, str], ...] = ()
    allow_empty_buckets: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        validate_name(args.split, "--split")
        if args.mode not in MODES:
            raise ConfigError(f"invalid --mode {args.mode!r}; valid modes: {', '.join(MODES)}")
        first, last = parse_year_range(args.years)
        require_minimum({"--buckets": args.buckets})
        ranges: tuple = ()
        if args.mode == "ranges":
            if not args.ranges_file:
                raise ConfigError("--mode ranges needs --ranges-file, a JSON list of "
                                  '{"start": ..., "end": ...} upload times')
            with open_input(args.ranges_file) as path:
                parsed = parse_ranges(path.read_text(), args.ranges_file)
            ranges = tuple((start.isoformat(), end.isoformat()) for start, end in parsed)
        return cls(args.artifact_root, args.split, args.mode, args.buckets, first, last, ranges,
                   args.allow_empty_buckets)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="default",
                        help="name of this bucketing; outputs go to buckets/<split>/ "
                        "(default: default)")
    parser.add_argument("--mode", default="year", choices=MODES,
                        help="year: one bucket per upload year; equal: N equal-size buckets "
                        "in upload order; ranges: upload-time ranges from --ranges-file "
                        "(default: year)")
    parser.add_argument("--years", default="2004-2014",
                        help="first and last upload year for --mode year (default: 2004-2014)")
    parser.add_argument("--buckets", type=int, default=11,
                        help="number of buckets for --mode equal (default: 11)")
    parser.add_argument("--ranges-file", default="",
                        help="JSON list of {\"start\", \"end\"} upload times (UTC, inclusive) "
                        "for --mode ranges: local path or s3:// URI")
    parser.add_argument("--allow-empty-buckets", action="store_true",
                        help="write empty buckets instead of failing")


def load_downloaded_samples(store: ArtifactStore):
    """Join every finished shard's `ok` samples with their shard-plan metadata."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # Where each sample sits in its shard tar, as the download manifest records it.
    location_schema = pa.schema([("photo_id", pa.int64()), ("member", pa.string()),
                                 ("offset", pa.int64()), ("bytes", pa.int64()),
                                 ("width", pa.int32()), ("height", pa.int32()),
                                 ("orientation", pa.int16())])
    plan = store.read_json(PLAN_KEY)
    tables = []
    finished = []
    for shard in plan["shards"]:
        if not store.exists(shard_stats_key(shard["id"])):
            logger.warning("shard %s is not downloaded yet; its samples are left out",
                           shard["id"])
            continue
        finished.append(shard["id"])
        with store.local_copy(shard_manifest_key(shard["id"])) as path:
            manifest = pq.read_table(path)
        manifest = manifest.filter(pc.equal(manifest["status"], "ok"))
        with store.local_copy(shard_key(shard["id"])) as path:
            planned = pq.read_table(path, columns=["photo_id", "line_number", "date_uploaded",
                                                   "date_taken", "extension"])
        located = manifest.select(list(location_schema.names)).cast(location_schema)
        joined = located.join(planned, "photo_id")
        shard_column = pa.array([shard["id"]] * joined.num_rows, pa.string())
        tables.append(joined.append_column("shard", shard_column))
    if not tables:
        raise StageError(f"no downloaded shard under {store.root!r}: run download first")
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by([("date_uploaded", "ascending"), ("line_number", "ascending"),
                          ("photo_id", "ascending")]), finished


def assign_buckets(table, config: Config) -> list[tuple[str, object]]:
    """Return `(bucket id, rows)` pairs in bucket order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if config.mode == "equal":
        bounds = np.array_split(np.arange(table.num_rows), config.buckets)
        return [(str(i), table.take(pa.array(rows, pa.int64()))) for i, rows in
                enumerate(bounds)]
    if config.mode == "year":
        year = pc.year(table["date_uploaded"])
        return [(str(i), table.filter(pc.equal(year, y))) for i, y in
                enumerate(range(config.first_year, config.last_year + 1))]
    uploaded = table["date_uploaded"]
    buckets = []
    for i, (start, end) in enumerate(config.ranges):
        low = pa.scalar(datetime.fromisoformat(start).replace(tzinfo=None), pa.timestamp("ms"))
        high = pa.scalar(datetime.fromisoformat(end).replace(tzinfo=None), pa.timestamp("ms"))
        inside = pc.and_(pc.greater_equal(uploaded, low), pc.less_equal(uploaded, high))
        buckets.append((str(i), table.filter(inside)))
    return buckets


def describe_bucket(key: str, bucket: str, rows) -> dict:
    import pyarrow.compute as pc

    entry = {"id": bucket, "key": key, "samples": rows.num_rows}
    if rows.num_rows:
        uploaded = pc.min_max(rows["date_uploaded"])
        lines = pc.min_max(rows["line_number"])
        entry.update(first_upload=uploaded["min"].as_py().isoformat(sep=" "),
                     last_upload=uploaded["max"].as_py().isoformat(sep=" "),
                     min_line=lines["min"].as_py(), max_line=lines["max"].as_py())
    return entry


def run(config: Config) -> dict:
    store = ArtifactStore(config.artifact_root)
    store.ensure_writable()
    with store.exclusive(f"buckets/{config.split}.lock"):
        return segment_split(store, config)


def segment_split(store: ArtifactStore, config: Config) -> dict:
    """Write the split's buckets unless they are up to date; the caller holds its lock."""
    import pyarrow.parquet as pq

    options = json.loads(json.dumps({key: value for key, value in asdict(config).items()
                                     if key != "artifact_root"}))
    table, finished = load_downloaded_samples(store)
    inputs = hashlib.sha256(json.dumps(
        [store.read_json(shard_stats_key(shard)) for shard in finished], sort_keys=True
    ).encode()).hexdigest()

    key = summary_key(config.split)
    previous = store.read_json(key) if store.exists(key) else None
    if previous is not None and previous["options"] != options:
        raise StageError(
            f"split {config.split!r} at {store.url(key)} was made with {previous['options']}, "
            f"not {options}; choose another --split name or delete buckets/{config.split}/"
        )
    if previous is not None and previous["inputs"] == inputs:
        logger.info("split %s is up to date with %d finished shards; nothing to do",
                    config.split, len(finished))
        return {"split": config.split, "buckets": [b["id"] for b in previous["buckets"]],
                "changed": False}

    buckets = assign_buckets(table, config)
    empty = [bucket for bucket, rows in buckets if rows.num_rows == 0]
    if empty and not config.allow_empty_buckets:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise StageError(
            f"{len(empty)} of {len(buckets)} buckets of split {config.split!r} are empty "
            f"(buckets {shown}; {config.mode} mode over {table.num_rows} samples); change "
            "--years, --buckets or the ranges, or pass --allow-empty-buckets"
        )

    # Bucket files go to a folder named after their inputs and options. The summary,
    # written last, switches readers to it, so a re-segment never rewrites files in use.
    version = "v-" + hashlib.sha256(json.dumps([inputs, options]).encode()).hexdigest()[:12]
    entries = []
    for bucket, rows in buckets:
        rows_key = bucket_key(config.split, version, bucket)
        with store.staged_file(rows_key) as path:
            pq.write_table(rows, path)
        entries.append(describe_bucket(rows_key, bucket, rows))
        logger.info("split %s bucket %s: %d samples %s .. %s", config.split, bucket,
                    rows.num_rows, entries[-1].get("first_upload"), entries[-1].get("last_upload"))
    store.write_json(key, {"split": config.split, "mode": config.mode, "options": options,
                           "inputs": inputs, "version": version, "shards": finished,
                           "samples": table.num_rows, "buckets": entries})
    if previous is not None and previous.get("version") not in (None, version):
        store.delete_prefix(f"buckets/{config.split}/{previous['version']}/")
    return {"split": config.split, "buckets": [entry["id"] for entry in entries],
            "samples": table.num_rows, "changed": True}
