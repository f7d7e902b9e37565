"""Benchmark train-moco's data loading against the demand of its training step, on CPU.

Builds `--images` real photographs (scikit-image's sample photos, cropped and flipped
per photo id, at most 500 px on the long side, JPEG quality 90) into one shard tar and
a bucket manifest in a temporary artifact root, then measures in one invocation:

- ours: the stage's data loader, built as train-moco builds it (`BucketDataset`,
  `TwoViews` of the aug+ pipeline and `build_loader` from tasks.moco_data) with
  `--workers` worker processes, over one epoch including worker start-up, in images
  per second; each image is read from the shard, decoded once and augmented into a
  query view and a key view;
- limit: the training step's demand, in images per second of the stage's
  `train_one_epoch` (both encoders forward, momentum update of the key encoder,
  backward, SGD step) on one batch from that loader, repeated `--steps` times after
  one warm-up step.

A ratio of 1 or more means loading keeps up with the step, so compute bounds
training; below 1, loading bounds it. Each side is measured with all cores to
itself. In a real run on one machine they share the cores, so the table also gives
the estimated rate of both together, 1 / (1/loader + 1/step).

The defaults are the stage's (224 px crops, K=65536, 8 batch-norm groups) except two,
so that a run takes a few minutes on a shared 2-core machine. The batch is 32 instead
of 256, because the step's cost per image changes little with the batch size on CPU.
The encoder is resnet18 instead of resnet50: resnet18's forward pass costs about 1.8
GFLOPs per 224 px image against resnet50's 4.1, so its step demands more images per
second, and loading that keeps up with resnet18 keeps up with resnet50 too. Pass
`--arch resnet50` to measure the stage default directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

FIRST_PHOTO_ID = 1000


def build_bucket(artifact_root: str, images: int, max_side: int) -> float:
    """Write shard 00000 and bucket 0 of split `default` with `images` photos; return MiB."""
    from tasks.storage import ArtifactStore

    from builders import make_jpeg, write_bucket, write_shard

    store = ArtifactStore(artifact_root)
    samples = {photo_id: make_jpeg(photo_id, max_side=max_side)
               for photo_id in range(FIRST_PHOTO_ID, FIRST_PHOTO_ID + images)}
    write_shard(store, "00000", samples)
    write_bucket(store, "default", "0", "00000", list(samples))
    return sum(len(data) for data in samples.values()) / 2**20


def build_config(artifact_root: str, args: argparse.Namespace):
    from tasks.moco import Config

    return Config(artifact_root=artifact_root, run="bench", arch=args.arch,
                  batch_size=args.batch_size, image_size=args.image_size,
                  workers=args.workers, bn_splits=args.bn_splits, device="cpu",
                  log_every=10**9)


def measure_loader(config) -> tuple[float, float, int, tuple]:
    """Run one epoch of the stage's loader.

    Returns (images/s, seconds to the first batch, images loaded, the first batch).
    """
    from tasks.distributed import DistributedContext
    from tasks.moco import build_training_data
    from tasks.storage import ArtifactStore

    context = DistributedContext(rank=0, world_size=1, local_rank=0, device="cpu")
    store = ArtifactStore(config.artifact_root)
    with tempfile.TemporaryDirectory(prefix="clear-bench-moco-cache-") as cache_dir:
        loader, sampler = build_training_data(store, config, context, Path(cache_dir))
        sampler.set_epoch(0)
        images = 0
        first_batch = None
        start = time.perf_counter()
        for im_q, im_k in loader:
            if first_batch is None:
                first_batch = (im_q, im_k)
                first_batch_seconds = time.perf_counter() - start
            images += im_q.shape[0]
        seconds = time.perf_counter() - start
    return images / seconds, first_batch_seconds, images, first_batch


def measure_step(config, batch: tuple, steps: int) -> float:
    """Time the stage's `train_one_epoch` on `batch` repeated `steps` times; return images/s."""
    import torch

    from tasks.distributed import DistributedContext
    from tasks.moco import build_training_model, train_one_epoch

    context = DistributedContext(rank=0, world_size=1, local_rank=0, device="cpu")
    torch.manual_seed(config.seed)
    model, optimizer, scaler = build_training_model(config, context)
    train_one_epoch(model, [batch], optimizer, scaler, config, context, 0, config.lr, None)

    start = time.perf_counter()
    train_one_epoch(model, [batch] * steps, optimizer, scaler, config, context, 0, config.lr,
                    None)
    seconds = time.perf_counter() - start
    return steps * config.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384,
                        help="photos in the bucket; one loader epoch reads all of them "
                        "(default: 384)")
    parser.add_argument("--max-side", type=int, default=500,
                        help="longest side of the photos in pixels (default: 500)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="DataLoader worker processes (default: the number of cores, one "
                        "single-threaded decoder per core)")
    parser.add_argument("--arch", default="resnet18",
                        help="torchvision ResNet of the encoders (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="side of the augmented crops in pixels (default: 224)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per loader batch and training step (default: 32)")
    parser.add_argument("--bn-splits", type=int, default=8,
                        help="batch-norm groups of the single-process step (default: 8)")
    parser.add_argument("--steps", type=int, default=2,
                        help="timed training steps after one warm-up step (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the training step (default: torch's "
                        "default, as in the stage)")
    args = parser.parse_args()
    if args.images < args.batch_size:
        parser.error(f"--images ({args.images}) must be at least --batch-size "
                     f"({args.batch_size})")

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="clear-bench-moco-") as artifact_root:
        bucket_mib = build_bucket(artifact_root, args.images, args.max_side)
        config = build_config(artifact_root, args)
        loader_rate, first_batch_seconds, loaded, batch = measure_loader(config)
        step_rate = measure_step(config, batch, args.steps)

    machine = f"{os.cpu_count()} cores"
    # Other processes on the machine slow both sides and make the ratio noisy.
    load = os.getloadavg()[0]
    ratio = loader_rate / step_rate
    shared_rate = 1.0 / (1.0 / loader_rate + 1.0 / step_rate)
    bound = "compute (the training step)" if ratio >= 1.0 else "data loading"
    step_label = (f"{args.arch}, {args.image_size} px, batch {args.batch_size}, fp32, "
                  f"{torch.get_num_threads()} threads")
    print(f"train-moco benchmark: {loaded} photos ({bucket_mib:.1f} MiB of JPEG, at most "
          f"{args.max_side} px), {args.image_size} px views, batch {args.batch_size}, {machine}, "
          f"1-minute load average {load:.1f} at the end")
    print(f"{'measurement':<72}{'images/s':>10}")
    print(f"{f'ours: stage DataLoader, {args.workers} workers, 2 views':<72}{loader_rate:>10.1f}")
    print(f"{f'limit: training step ({step_label})':<72}{step_rate:>10.1f}")
    print(f"{'estimate: both sharing the cores':<72}{shared_rate:>10.1f}")
    print(f"loader start-up (seconds to first batch): {first_batch_seconds:.2f}")
    print(f"loader / step = {ratio:.2f} (target 1.0): {bound} bounds training on this machine")
    print(json.dumps({"benchmark": "moco", "metric": "images_per_second",
                      "ours": round(loader_rate, 1),
                      "peer": f"training step demand ({step_label})",
                      "peer_value": round(step_rate, 1), "ratio": round(ratio, 2),
                      "target": 1.0, "workers": args.workers, "images": loaded,
                      "load_average": round(load, 1), "machine": machine}))


if __name__ == "__main__":
    main()
