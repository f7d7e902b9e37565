"""Run the metadata stages on the real sample and fake a finished download of every shard."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import metadata, shards
from tasks.images import shard_manifest_key, shard_stats_key
from tasks.storage import ArtifactStore


def plan_sample(root: str, sample: Path, shard_size: int = 200, **filters) -> dict:
    metadata.run(metadata.Config(root, str(sample)))
    return shards.run(shards.Config(root, shard_size, shards.Filters(**filters)))


def mark_downloaded(root: str, failed: set[int] = frozenset()) -> None:
    """Write download manifests that say every planned photo is `ok` (or failed)."""
    store = ArtifactStore(root)
    for shard in store.read_json(shards.PLAN_KEY)["shards"]:
        planned = pq.read_table(io.BytesIO(store.read_bytes(shard["key"])))
        rows = []
        for index, photo_id in enumerate(planned["photo_id"].to_pylist()):
            status = "http_error" if photo_id in failed else "ok"
            rows.append({"photo_id": photo_id, "status": status,
                         "member": f"{photo_id}.jpg" if status == "ok" else None,
                         "offset": 512 * (2 * index + 1), "bytes": 100, "width": 64,
                         "height": 48, "orientation": None})
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        store.write_bytes(shard_manifest_key(shard["id"]), sink.getvalue())
        store.write_json(shard_stats_key(shard["id"]), {"shard": shard["id"],
                                                        "samples": len(rows)})


def sample_photos(sample: Path) -> list[dict]:
    """CLEAR's filters applied to the raw TSV in plain Python: an independent oracle."""
    photos = []
    for line in sample.read_text().splitlines():
        fields = line.split("\t")
        if fields[24] != "0":
            continue
        try:
            taken = datetime.strptime(fields[5].split(".")[0], "%Y-%m-%d %H:%M:%S")
        except ValueError:
            continue
        uploaded = datetime.fromtimestamp(int(fields[6]), UTC).replace(tzinfo=None)
        if taken < uploaded:
            photos.append({"photo_id": int(fields[1]), "line": int(fields[0]),
                           "uploaded": uploaded, "url": fields[16], "hash": fields[2]})
    return photos
