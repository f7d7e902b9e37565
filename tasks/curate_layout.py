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
  curate writes it last, over every finished bucket, so it marks the dataset finished
  and lists the buckets that the stages after curate read.
- `filelists/<bucket>.txt`: `<IMG_PATH> <class index>` per line. It is written last for
  its bucket, so its presence marks the bucket finished.
- `clip_result.json`: `{bucket: {class: [{"photo_id", "score", "concept"}, ...]}}` in
  rank order; scores are cosine similarities to the prompt of `concept`.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from tasks.clear_layout import DATASET_INDEX, filelist_key
from tasks.curate_retrieval import Pick
from tasks.images import ShardReader
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

# Part of the name of a local write's temporary file, as ArtifactStore writes it.
TEMPORARY_MARKER = ".tmp-"


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


def remove_bucket_leftovers(store: ArtifactStore, prefix: str, bucket: str) -> None:
    """Delete what an interrupted earlier attempt at an unfinished bucket left behind.

    That is its images and metadata, and on a local root also the temporary files of
    writes that a killed process never renamed into place (`.<name>.tmp-<pid>-<id>`,
    which ArtifactStore.list leaves out). S3 writes leave no temporary objects.
    """
    folders = [f"{prefix}/labeled_images/{bucket}", f"{prefix}/labeled_metadata/{bucket}"]
    for folder in folders:
        store.delete_prefix(f"{folder}/")
    if store.is_s3:
        return
    temporary = [path for folder in folders for path in (store.path / folder).rglob("*")
                 if TEMPORARY_MARKER in path.name and path.is_file()]
    for name in (f"filelists/{bucket}.txt", f"report/contact_sheet_{bucket}.png"):
        target = store.path / prefix / name
        temporary += target.parent.glob(f".{target.name}{TEMPORARY_MARKER}*")
    for path in temporary:
        path.unlink(missing_ok=True)
    if temporary:
        logger.info("bucket %s: removed %d temporary files of an interrupted run under %s",
                    bucket, len(temporary), store.url(prefix))


def write_bucket(store: ArtifactStore, prefix: str, bucket: str,
                 selection: dict[str, list[Pick]], rows: list[dict], class_names: list[str],
                 concept_texts: list[str], reader: ShardReader) -> dict[str, list[bytes]]:
    """Write one bucket's images, metadata and filelist; return the image bytes per class.

    The caller removes leftovers of an earlier attempt first (remove_bucket_leftovers).
    """
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
    """Write clip_result.json, then labeled_metadata.json, over every finished bucket.

    labeled_metadata.json comes last because it marks the dataset finished.
    """
    store.write_json(f"{prefix}/clip_result.json", {
        bucket: {name: [{"photo_id": entry["ID"], "score": entry["SCORE"],
                         "concept": entry["CONCEPT"]} for entry in entries]
                 for name, entries in classes.items()}
        for bucket, classes in metadata.items()})
    store.write_json(f"{prefix}/{DATASET_INDEX}", {
        bucket: {name: class_metadata_key(bucket, name) for name in class_names}
        for bucket in metadata})
