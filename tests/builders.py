"""Build small, real artifacts inside tests, in the same formats the stages write.

Photographs come from scikit-image's bundled sample images, varied per photo id by a
crop and a flip so that every sample has its own bytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.storage import ArtifactStore

PHOTO_NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "hubble_deep_field.jpg", "retina.jpg", "brick.png", "grass.png", "camera.png"]


def photo_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def make_photo(photo_id: int, max_side: int = 96) -> Image.Image:
    """A real photograph, cropped and flipped according to `photo_id`."""
    name = PHOTO_NAMES[photo_id % len(PHOTO_NAMES)]
    image = Image.open(photo_folder() / name).convert("RGB")
    width, height = image.size
    shift = (photo_id // len(PHOTO_NAMES)) % 7
    box = (shift * width // 40, shift * height // 50, width - shift * width // 60, height)
    image = image.crop(box)
    if photo_id % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.thumbnail((max_side, max_side))
    return image


def make_jpeg(photo_id: int, max_side: int = 96) -> bytes:
    buffer = io.BytesIO()
    make_photo(photo_id, max_side).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(store: ArtifactStore, shard_id: str, samples: dict[int, bytes]) -> None:
    """Write `images/shard-<id>.tar` and its manifest with every sample `ok`."""
    buffer = io.BytesIO()
    rows = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for photo_id, data in samples.items():
            info = tarfile.TarInfo(f"{photo_id}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r") as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    for photo_id, data in samples.items():
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        rows.append({"photo_id": photo_id, "url": f"http://example.invalid/{photo_id}.jpg",
                     "status": "ok", "error": None, "http_status": 200, "bytes": len(data),
                     "width": width, "height": height,
                     "sha256": hashlib.sha256(data).hexdigest(), "member": f"{photo_id}.jpg",
                     "offset": offsets[f"{photo_id}.jpg"], "orientation": 1, "format": "JPEG",
                     "attempts": 1})
    store.write_bytes(f"images/shard-{shard_id}.tar", buffer.getvalue())
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    store.write_bytes(f"images/shard-{shard_id}.parquet", sink.getvalue())


def write_bucket(store: ArtifactStore, split: str, bucket: str, shard_id: str,
                 photo_ids: list[int], start: datetime = datetime(2010, 1, 1)) -> None:
    """Write a bucket manifest pointing at samples of one shard written by write_shard."""
    manifest = pq.read_table(io.BytesIO(store.read_bytes(f"images/shard-{shard_id}.parquet")))
    by_id = {row["photo_id"]: row for row in manifest.to_pylist()}
    rows = []
    for index, photo_id in enumerate(photo_ids):
        row = by_id[photo_id]
        rows.append({"photo_id": photo_id, "line_number": index,
                     "date_uploaded": start + timedelta(hours=index),
                     "date_taken": start + timedelta(hours=index - 1), "shard": shard_id,
                     "member": row["member"], "offset": row["offset"], "bytes": row["bytes"],
                     "extension": "jpg", "orientation": 1, "width": row["width"],
                     "height": row["height"]})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    store.write_bytes(f"buckets/{split}/bucket-{bucket}.parquet", sink.getvalue())
    summary_key = f"buckets/{split}/summary.json"
    summary = store.read_json(summary_key) if store.exists(summary_key) else {
        "split": split, "mode": "test", "buckets": []}
    summary["buckets"] = [b for b in summary["buckets"] if b["id"] != bucket] + [
        {"id": bucket, "key": f"buckets/{split}/bucket-{bucket}.parquet",
         "samples": len(rows)}]
    summary["buckets"].sort(key=lambda b: int(b["id"]))
    store.write_json(summary_key, summary)


def random_image_array(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def tiny_clip_checkpoint(folder: Path) -> Path:
    """Write the deterministic `clear-tiny` CLIP weights into `folder` once and return the path."""
    from tasks.clip_models import write_tiny_checkpoint

    path = folder / "clear-tiny.pt"
    if not path.exists():
        write_tiny_checkpoint(path)
    return path


def write_labeled_dataset(store: ArtifactStore, name: str, buckets: list[str],
                          class_names: list[str], per_class: int, max_side: int = 48) -> None:
    """Write a small curated dataset in CLEAR's layout under `datasets/<name>/`.

    Photo ids are unique across buckets and classes. Writes `class_names.txt`,
    `labeled_images/<bucket>/<class>/<id>.jpg`, `filelists/<bucket>.txt`,
    `labeled_metadata/<bucket>/<class>.json` and `labeled_metadata.json`.
    """
    import json

    prefix = f"datasets/{name}"
    store.write_text(f"{prefix}/class_names.txt", "\n".join(class_names) + "\n")
    index = {}
    photo_id = 1000
    for bucket in buckets:
        lines = []
        index[bucket] = {}
        for label, class_name in enumerate(class_names):
            metadata = {}
            for _ in range(per_class):
                path = f"labeled_images/{bucket}/{class_name}/{photo_id}.jpg"
                store.write_bytes(f"{prefix}/{path}", make_jpeg(photo_id, max_side))
                lines.append(f"{path} {label}")
                metadata[str(photo_id)] = {"ID": str(photo_id), "IMG_PATH": path}
                photo_id += 1
            metadata_path = f"labeled_metadata/{bucket}/{class_name}.json"
            store.write_text(f"{prefix}/{metadata_path}", json.dumps(metadata))
            index[bucket][class_name] = metadata_path
        store.write_text(f"{prefix}/filelists/{bucket}.txt", "\n".join(lines) + "\n")
    store.write_text(f"{prefix}/labeled_metadata.json", json.dumps(index))
