"""Training data for MoCo: the samples of one bucket, read from shard tars, as two views.

A bucket manifest (`buckets/<split>/bucket-<id>.parquet`, written by the segment
stage) lists each sample's shard, data offset and size. The dataset seeks into the
shard tar through `ShardReader` and decodes with `decode_image`, so EXIF orientation is
applied as in every other stage. Each sample becomes two independently augmented
views with the MoCo v2 "aug+" recipe.

This module imports torch at import time. Stage modules import it inside functions only.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from PIL import ImageFilter, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tasks.errors import StageError
from tasks.images import ShardReader, decode_image
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A failed decode is logged for the first sample and then for every Nth.
DECODE_FAILURE_LOG_EVERY = 100


def bucket_manifest_key(store: ArtifactStore, split: str, bucket: str) -> str:
    """Look up the manifest key of `bucket` in `buckets/<split>/summary.json`."""
    from tasks.segment import find_bucket_key

    return find_bucket_key(store, split, bucket)


class RandomGaussianBlur:
    """Blur a PIL image with a Gaussian whose sigma is drawn uniformly from `sigma`.

    The MoCo v2 recipe blurs with PIL's radius (no kernel size), which torchvision's
    GaussianBlur cannot express. The draw uses torch's RNG, so DataLoader worker seeding
    makes it reproducible.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        radius = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def build_augmentation(image_size: int):
    """Build the MoCo v2 "aug+" pipeline for one view."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViews:
    """Apply one random augmentation twice: the query view and the key view."""

    def __init__(self, augmentation):
        self.augmentation = augmentation

    def __call__(self, image):
        return self.augmentation(image), self.augmentation(image)


class BucketDataset(Dataset):
    """The samples of one bucket manifest, decoded from shard tars."""

    def __init__(self, store: ArtifactStore, manifest_key: str, transform,
                 cache_dir: Path | None = None):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(store.read_bytes(manifest_key)),
                              columns=["photo_id", "shard", "offset", "bytes"])
        self.photo_ids = table.column("photo_id").to_pylist()
        self.shards = [str(shard) for shard in table.column("shard").to_pylist()]
        self.offsets = table.column("offset").to_pylist()
        self.sizes = table.column("bytes").to_pylist()
        self.reader = ShardReader(store, cache_dir)
        self.transform = transform
        self.decode_failures = 0

    def __len__(self) -> int:
        return len(self.photo_ids)

    def _load(self, index: int):
        data = self.reader.read(self.shards[index], self.offsets[index], self.sizes[index])
        return decode_image(data)

    def __getitem__(self, index: int):
        # An undecodable sample is replaced by the next one, so one bad image cannot
        # stop an epoch. Replacements are counted and logged with the photo id.
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                image = self._load(position)
            except (UnidentifiedImageError, OSError) as error:
                self.decode_failures += 1
                if self.decode_failures % DECODE_FAILURE_LOG_EVERY == 1:
                    logger.warning("cannot decode photo %s from shard %s (%s); using the next "
                                   "sample instead (%d failures in this worker)",
                                   self.photo_ids[position], self.shards[position], error,
                                   self.decode_failures)
                continue
            return self.transform(image)
        raise StageError("no sample of the bucket could be decoded; check the shard tars")


def _limit_worker_threads(worker_id: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only contend.
    torch.set_num_threads(1)


def build_loader(dataset: BucketDataset, local_batch_size: int, workers: int, rank: int,
                 world_size: int, seed: int) -> tuple[DataLoader, DistributedSampler]:
    """Build a shuffling loader over this rank's share of the bucket; call `sampler.set_epoch`."""
    if len(dataset) < local_batch_size * world_size:
        raise StageError(f"the bucket has {len(dataset)} samples, fewer than one global batch "
                         f"of {local_batch_size * world_size}; lower --batch-size")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=local_batch_size, sampler=sampler,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        drop_last=True, persistent_workers=False,
                        worker_init_fn=_limit_worker_threads if workers else None)
    return loader, sampler
