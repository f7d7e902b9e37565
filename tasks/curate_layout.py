"""Writing a curated dataset in CLEAR's folder layout, which Avalanche's CLEAR loader reads.

Under `datasets/<NAME>/`:

- `class_names.txt`: class names sorted, joined by newlines without a trailing one,
  because Avalanche splits the file on "\\n" and would read an empty last class.
  Line number = class index.
- `labeled_images/<bucket>/<class>/<photo_id>.<ext>`: the original downloaded bytes.
- `labeled_metadata/<bucket>/<class>.json`: `{photo_id: {"ID", "IMG_PATH", "SCORE",
  "RANK", "CONCEPT", "EXT", "DATE_UPLOADED", "DATE_TAKEN", "LINE_NUMBER", "SHARD"}}`,
  with `IMG_PATH` relative to the dataset folder; every class has a file, empty or not.
- `labeled_metadata.json`: `{bucket: {class: "labeled_metadata/<bucket>/<class>.json"}}`.
- `filelists/<bucket>.txt`: `<IMG_PATH> <class index>` per line. It is written last for
  its bucket, so its presence marks the bucket finished.
- `clip_result.json`: `{bucket: {class: [{"photo_id", "score", "concept"}, ...]}}` in
  rank order; scores are cosine similarities to the prompt of `concept`.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from tasks.curate_retrieval import Pick
from tasks.images import ShardReader
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)


def filelist_key(prefix: str, bucket: str) -> str:
    return f"{prefix}/filelists/{bucket}.txt"


def class_metadata_key(bucket: str, class_name: str) -> str:
    """Key of a class's metadata, relative to the dataset folder."""
    return f"labeled_metadata/{bucket}/{class_name}.json"


def finished_buckets(store: ArtifactStore, prefix: str) -> list[str]:
    keys = store.list(f"{prefix}/filelists/")
    buckets = [key.rsplit("/", 1)[1][: -len(".txt")] for key in keys if key.endswith(".txt")]
    return sorted(buckets, key=lambda b: (len(b), b))


def _extension(row: dict) -> str:
    extension = re.sub(r"[^a-z0-9]", "", str(row.get("extension") or "jpg").lower())
    return extension or "jpg"


def _timestamp(value) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def write_bucket(store: ArtifactStore, prefix: str, bucket: str,
                 selection: dict[str, list[Pick]], rows: list[dict], class_names: list[str],
                 concept_texts: list[str], reader: ShardReader) -> dict[str, list[bytes]]:
    """Write one bucket's images, metadata and filelist; return the image bytes per class.

    Leftovers of an interrupted earlier attempt at this bucket are removed first.
    """
    store.delete_prefix(f"{prefix}/labeled_images/{bucket}/")
    store.delete_prefix(f"{prefix}/labeled_metadata/{bucket}/")
    images: dict[str, list[bytes]] = {}
    filelist: list[str] = []
    for class_index, class_name in enumerate(class_names):
        metadata = {}
        images[class_name] = []
        for rank, pick in enumerate(selection.get(class_name, [])):
            row = rows[pick.row]
            extension = _extension(row)
            image_path = f"labeled_images/{bucket}/{class_name}/{row['photo_id']}.{extension}"
            data = reader.read(row["shard"], row["offset"], row["bytes"])
            store.write_bytes(f"{prefix}/{image_path}", data)
            images[class_name].append(data)
            metadata[str(row["photo_id"])] = {
                "ID": row["photo_id"], "IMG_PATH": image_path, "SCORE": pick.score,
                "RANK": rank, "CONCEPT": concept_texts[pick.concept], "EXT": extension,
                "DATE_UPLOADED": _timestamp(row.get("date_uploaded")),
                "DATE_TAKEN": _timestamp(row.get("date_taken")),
                "LINE_NUMBER": row.get("line_number"), "SHARD": row["shard"],
            }
            filelist.append(f"{image_path} {class_index}")
        store.write_json(f"{prefix}/{class_metadata_key(bucket, class_name)}", metadata)
    store.write_text(filelist_key(prefix, bucket), "".join(line + "\n" for line in filelist))
    return images


def read_bucket_metadata(store: ArtifactStore, prefix: str, bucket: str,
                         class_names: list[str]) -> dict[str, list[dict]]:
    """Read each class's metadata entries of a finished bucket, in rank order."""
    result = {}
    for class_name in class_names:
        entries = store.read_json(f"{prefix}/{class_metadata_key(bucket, class_name)}")
        result[class_name] = sorted(entries.values(), key=lambda entry: entry["RANK"])
    return result


def write_dataset_index(store: ArtifactStore, prefix: str, class_names: list[str],
                        metadata: dict[str, dict[str, list[dict]]]) -> None:
    """Write labeled_metadata.json and clip_result.json over every finished bucket."""
    store.write_json(f"{prefix}/labeled_metadata.json", {
        bucket: {name: class_metadata_key(bucket, name) for name in class_names}
        for bucket in metadata})
    store.write_json(f"{prefix}/clip_result.json", {
        bucket: {name: [{"photo_id": entry["ID"], "score": entry["SCORE"],
                         "concept": entry["CONCEPT"]} for entry in entries]
                 for name, entries in classes.items()}
        for bucket, classes in metadata.items()})
