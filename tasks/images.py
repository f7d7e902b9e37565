"""Reading samples back from shard tars, and decoding them the same way in every stage.

A shard tar is a plain, uncompressed tar whose members are `<photo_id>.<ext>` holding
the original downloaded bytes. The shard's Parquet manifest stores each member's data
offset and size, so readers seek straight to a sample instead of scanning the tar.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)


def shard_tar_key(shard_id: str) -> str:
    return f"images/shard-{shard_id}.tar"


def shard_manifest_key(shard_id: str) -> str:
    return f"images/shard-{shard_id}.parquet"


def shard_stats_key(shard_id: str) -> str:
    return f"images/shard-{shard_id}.stats.json"


def decode_image(data: bytes):
    """Decode image bytes into an RGB PIL image with its EXIF orientation applied.

    Raises PIL.UnidentifiedImageError or OSError for bytes that are not a readable image.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


class ShardReader:
    """Random access to samples of shard tars, cached as local files.

    Local artifact roots are read in place; S3 shards are downloaded once into
    `cache_dir`. Open file handles are per process, so one reader may be used inside
    each DataLoader worker.
    """

    def __init__(self, store: ArtifactStore, cache_dir: Path | None = None):
        self.store = store
        self.cache_dir = cache_dir
        self._paths: dict[str, Path] = {}
        self._handles: dict[str, object] = {}

    def _path(self, shard_id: str) -> Path:
        if shard_id not in self._paths:
            key = shard_tar_key(shard_id)
            if not self.store.is_s3:
                self._paths[shard_id] = self.store.path / key
            else:
                if self.cache_dir is None:
                    raise ValueError("a cache_dir is needed to read shards from S3")
                path = self.cache_dir / Path(key).name
                if not path.exists():
                    self.store.get_file(key, path)
                self._paths[shard_id] = path
        return self._paths[shard_id]

    def read(self, shard_id: str, offset: int, size: int) -> bytes:
        handle = self._handles.get(shard_id)
        if handle is None:
            handle = open(self._path(shard_id), "rb")  # noqa: SIM115 - kept open for reuse
            self._handles[shard_id] = handle
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise OSError(f"shard {shard_id} is truncated: wanted {size} bytes at {offset}")
        return data

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __getstate__(self):
        # DataLoader workers get a copy without open handles.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
