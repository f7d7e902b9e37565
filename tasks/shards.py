"""plan-shards: filter the metadata and cut the photos to download into fixed-size shards.

Filters follow CLEAR: photos only (no videos) whose date taken is valid and earlier
than the upload date. Optional filters select licenses, a range of upload years and
a maximum number of photos per user. Photos are de-duplicated by download URL and by
YFCC100M hash, keeping the first in metadata line order.

Shard ids are stable: a re-run keeps every shard of `shards/plan.json` as it is and
puts only photos that no shard holds yet into new shards, so metadata appended later
never renumbers work that was already downloaded. A re-run with different filters is
rejected instead of silently mixing two plans.

Writes `shards/shard-NNNNN.parquet` (the samples of each shard) and then
`shards/plan.json`, which lists the shards and is the commit marker.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass

from tasks.errors import StageError
from tasks.metadata import load_metadata
from tasks.options import parse_year_range, require_minimum
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

PLAN_KEY = "shards/plan.json"
PLAN_FORMAT = 1
SHARD_COLUMNS = ["photo_id", "line_number", "hash", "download_url", "extension",
                 "date_uploaded", "date_taken", "user_nsid", "license_name"]


def shard_key(shard_id: str) -> str:
    return f"shards/shard-{shard_id}.parquet"


@dataclass(frozen=True)
class Filters:
    licenses: tuple[str, ...] = ()
    min_year: int | None = None
    max_year: int | None = None
    max_per_user: int | None = None


@dataclass(frozen=True)
class Config:
    artifact_root: str
    shard_size: int = 10_000
    filters: Filters = Filters()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        require_minimum({"--shard-size": args.shard_size, "--max-per-user": args.max_per_user})
        min_year = max_year = None
        if args.years:
            min_year, max_year = parse_year_range(args.years)
        licenses = tuple(name.strip() for name in args.licenses.split(",") if name.strip()) \
            if args.licenses else ()
        return cls(args.artifact_root, args.shard_size,
                   Filters(licenses, min_year, max_year, args.max_per_user))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-size", type=int, default=10_000,
                        help="photos per shard (default: 10000; CLEAR used 50000)")
    parser.add_argument("--licenses", default="",
                        help="comma-separated license names to keep, as in the metadata's "
                        "license column, e.g. 'Attribution License' (default: all)")
    parser.add_argument("--years", default="",
                        help="keep uploads from FIRST-LAST years inclusive, e.g. 2004-2014 "
                        "(default: all)")
    parser.add_argument("--max-per-user", type=int, default=None,
                        help="keep at most this many photos per user, the earliest uploads "
                        "first (default: no limit)")


def select_photos(table, filters: Filters):
    """Apply CLEAR's filters, the optional ones, and de-duplication, in line order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.and_(pc.invert(table["is_video"]), table["date_taken_valid"])
    keep = pc.and_(keep, pc.less(table["date_taken"], table["date_uploaded"]))
    if filters.licenses:
        keep = pc.and_(keep, pc.is_in(table["license_name"], pa.array(filters.licenses)))
    if filters.min_year is not None:
        year = pc.year(table["date_uploaded"])
        keep = pc.and_(keep, pc.and_(pc.greater_equal(year, filters.min_year),
                                     pc.less_equal(year, filters.max_year)))
    table = table.filter(pc.fill_null(keep, False))
    table = table.sort_by([("line_number", "ascending")])

    seen_urls: set[str] = set()
    seen_hashes: set[str] = set()
    per_user: dict[str, int] = {}
    mask = []
    for url, digest, user in zip(table["download_url"].to_pylist(), table["hash"].to_pylist(),
                                 table["user_nsid"].to_pylist(), strict=True):
        duplicate = url in seen_urls or (digest and digest in seen_hashes)
        over_limit = filters.max_per_user is not None and \
            per_user.get(user, 0) >= filters.max_per_user
        mask.append(not duplicate and not over_limit)
        if mask[-1]:
            seen_urls.add(url)
            if digest:
                seen_hashes.add(digest)
            per_user[user] = per_user.get(user, 0) + 1
    return table.filter(pa.array(mask, pa.bool_()))


def _planned_photo_ids(store: ArtifactStore, plan: dict) -> set[int]:
    import pyarrow.parquet as pq

    planned: set[int] = set()
    for shard in plan["shards"]:
        with store.local_copy(shard["key"]) as path:
            planned.update(pq.read_table(path, columns=["photo_id"])["photo_id"].to_pylist())
    return planned


def run(config: Config) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    store = ArtifactStore(config.artifact_root)
    store.ensure_writable()
    # A JSON round trip makes the options comparable with the ones read from the plan.
    options = json.loads(json.dumps({"shard_size": config.shard_size,
                                     "filters": asdict(config.filters)}))
    plan = store.read_json(PLAN_KEY) if store.exists(PLAN_KEY) else None
    if plan is not None and plan["options"] != options:
        raise StageError(
            f"{store.url(PLAN_KEY)} was planned with {plan['options']}, not {options}; keep "
            "the original options or use a new --artifact-root for a different plan"
        )
    plan = plan or {"format": PLAN_FORMAT, "options": options, "shards": []}

    metadata = load_metadata(store, SHARD_COLUMNS + ["is_video", "date_taken_valid"])
    table = select_photos(metadata, config.filters).select(SHARD_COLUMNS)
    selected = table.num_rows
    if selected == 0:
        licenses = sorted(set(metadata["license_name"].to_pylist()))
        raise StageError(
            f"no photo of {metadata.num_rows} metadata rows passes the filters "
            f"{asdict(config.filters)}; check --licenses against the license names in the "
            f"metadata ({'; '.join(licenses)}) and --years"
        )
    planned = _planned_photo_ids(store, plan)
    if planned:
        table = table.filter(pc.invert(pc.is_in(table["photo_id"], pa.array(list(planned)))))
    logger.info("%d photos pass the filters; %d are already planned, %d are new", selected,
                selected - table.num_rows, table.num_rows)

    added = []
    for start in range(0, table.num_rows, config.shard_size):
        shard_id = f"{len(plan['shards']):05d}"
        key = shard_key(shard_id)
        with store.staged_file(key) as path:
            pq.write_table(table.slice(start, config.shard_size), path)
        samples = min(config.shard_size, table.num_rows - start)
        plan["shards"].append({"id": shard_id, "key": key, "samples": samples})
        added.append(shard_id)
        logger.info("shard %s: %d samples", shard_id, samples)
    if added or not store.exists(PLAN_KEY):
        store.write_json(PLAN_KEY, plan)
    else:
        logger.info("no new photos; the plan of %d shards is unchanged", len(plan["shards"]))
    return {"shards": [shard["id"] for shard in plan["shards"]], "new_shards": added,
            "samples": selected}
