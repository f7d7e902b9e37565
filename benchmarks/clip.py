"""Benchmark extract-clip on CPU against the model alone and a CLEAR-style loop.

Writes real photographs (scikit-image's bundled photos, cropped per photo id by
`tests/builders.py` and shrunk to 500 px on the long side like Flickr's medium size)
into one shard tar and one bucket manifest under a temporary artifact root. Then, for
each model and on the same images, batch size and model object, it measures:

- ours: `tasks.clip.run()` end to end: read the bucket manifest, read and decode
  the samples from the shard tar in DataLoader workers, embed them, write the chunks
  and the manifest. The model is loaded once beforehand and its load time is
  reported apart, so that all three rows time the same work per image;
- limit: the model alone on tensors that were decoded and transformed beforehand;
- peer: a loop like the original CLEAR feature extraction, which reads, decodes and
  transforms each image in the main process without DataLoader workers.

Models: `ViT-B/32` with random weights is CLEAR's default architecture. Its forward
pass dominates, and the 0.85 target for ours / limit applies to it. `clear-tiny` is
the pipeline's test model with 32 px input. Its forward pass costs far less than
decoding one photo, so its ours / limit ratio shows the decoding cost and cannot reach
that target on CPU. Throughput does not depend on the weights, and no weights can be
downloaded here. Each measurement runs `--repeats` times and the fastest run counts,
because other processes on a shared machine slow single runs down.

Prints a table, then one JSON object per comparison.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "tests")]

from tasks import clip, clip_models  # noqa: E402
from tasks.images import ShardReader, decode_image  # noqa: E402
from tasks.storage import ArtifactStore  # noqa: E402

from builders import make_jpeg, tiny_clip_checkpoint, write_bucket, write_shard  # noqa: E402

FLICKR_MEDIUM_SIDE = 500
SPLIT, BUCKET, SHARD = "default", "0", "00000"
FIRST_PHOTO_ID = 10_000


@functools.cache
def photo_bytes(variant: int) -> bytes:
    return make_jpeg(variant, FLICKR_MEDIUM_SIDE)


def photo_jpeg(photo_id: int) -> bytes:
    # make_jpeg picks the photo from photo_id % 10 and the crop from (photo_id // 10) % 7,
    # so ids with equal photo_id % 70 give the same bytes, and each is encoded only once.
    return photo_bytes(photo_id % 70)


def build_bucket(root: Path, count: int) -> ArtifactStore:
    store = ArtifactStore(str(root))
    photo_ids = list(range(FIRST_PHOTO_ID, FIRST_PHOTO_ID + count))
    write_shard(store, SHARD, {photo_id: photo_jpeg(photo_id) for photo_id in photo_ids})
    write_bucket(store, SPLIT, BUCKET, SHARD, photo_ids)
    return store


def write_random_checkpoint(open_clip_name: str, path: Path) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(open_clip_name, pretrained=None, device="cpu")
    torch.save(model.state_dict(), path)
    return path


def model_checkpoint(name: str, folder: Path) -> Path:
    if name == clip_models.TINY_MODEL:
        return tiny_clip_checkpoint(folder)
    return write_random_checkpoint(clip_models.resolve_model_name(name),
                                   folder / f"{clip_models.model_slug(name)}.pt")


class Timer:
    """Wall-clock seconds and CPU seconds of this process and its finished children."""

    def __enter__(self) -> Timer:
        self.start_wall = time.perf_counter()
        self.start_cpu = self.cpu_seconds()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall = time.perf_counter() - self.start_wall
        self.cpu = self.cpu_seconds() - self.start_cpu

    @staticmethod
    def cpu_seconds() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime


def forward(loaded, images) -> None:
    import torch

    with torch.no_grad():
        loaded.model.encode_image(images).float().cpu()


def time_stage(store: ArtifactStore, loaded, checkpoint: Path,
               args: argparse.Namespace) -> Timer:
    """Run extract-clip on the bucket with the already loaded model."""
    shutil.rmtree(store.path / "features", ignore_errors=True)
    config = clip.Config(artifact_root=store.root, split=SPLIT, bucket=BUCKET, model=loaded.name,
                         checkpoint=str(checkpoint), batch_size=args.batch_size,
                         workers=args.workers, device="cpu", precision="fp32",
                         jpeg_draft=args.jpeg_draft)
    real_load_clip = clip_models.load_clip
    # run() imports load_clip from tasks.clip_models when it is called, so this hands it
    # the model that the other two measurements use.
    clip_models.load_clip = lambda *args, **kwargs: loaded
    try:
        with Timer() as timer:
            summary = clip.run(config)
    finally:
        clip_models.load_clip = real_load_clip
    if summary["samples"] != len(clip.read_bucket_rows(store, SPLIT, BUCKET)):
        raise SystemExit(f"error: extract-clip embedded {summary['samples']} samples, "
                         f"expected every sample of the bucket: {summary}")
    return timer


def time_model_alone(loaded, batches) -> Timer:
    with Timer() as timer:
        for images in batches:
            forward(loaded, images)
    return timer


def time_clear_loop(store: ArtifactStore, loaded, rows: list[dict], batch_size: int) -> Timer:
    import torch

    with Timer() as timer:
        reader = ShardReader(store)
        for batch_start in range(0, len(rows), batch_size):
            images = []
            for row in rows[batch_start:batch_start + batch_size]:
                data = reader.read(row["shard"], row["offset"], row["bytes"])
                images.append(loaded.preprocess(decode_image(data)))
            forward(loaded, torch.stack(images))
        reader.close()
    return timer


def benchmark_model(name: str, count: int, args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    store = build_bucket(tmp / clip_models.model_slug(name), count)
    checkpoint = model_checkpoint(name, tmp)
    with Timer() as load:
        loaded = clip_models.load_clip(name, checkpoint=str(checkpoint), device="cpu")

    rows = clip.read_bucket_rows(store, SPLIT, BUCKET)
    reader = ShardReader(store)
    tensors = [loaded.preprocess(decode_image(reader.read(r["shard"], r["offset"], r["bytes"])))
               for r in rows]
    reader.close()
    batches = [torch.stack(tensors[i:i + args.batch_size])
               for i in range(0, len(tensors), args.batch_size)]
    forward(loaded, batches[0])

    timers: dict[str, list[Timer]] = {"ours": [], "limit": [], "peer": []}
    for _ in range(args.repeats):
        timers["ours"].append(time_stage(store, loaded, checkpoint, args))
        timers["limit"].append(time_model_alone(loaded, batches))
        timers["peer"].append(time_clear_loop(store, loaded, rows, args.batch_size))
    return {"model": name, "images": count, "load_seconds": load.wall,
            "rates": {key: [count / t.wall for t in values] for key, values in timers.items()},
            "cpu_ms": {key: [1000 * t.cpu / count for t in values]
                       for key, values in timers.items()}}


def print_results(results: list[dict], args: argparse.Namespace, machine: str) -> None:
    labels = {"ours": "ours: extract-clip run()", "limit": "model alone, pre-decoded",
              "peer": "CLEAR-style loop, no workers"}
    draft = "on" if args.jpeg_draft else "off"
    print(f"extract-clip benchmark: batch size {args.batch_size}, {args.workers} DataLoader "
          f"workers, JPEG draft {draft}, {machine}, torch {torch_threads()} threads, "
          f"best of {args.repeats}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'model':<12}{'images':>8}{'measurement':>32}{'best img/s':>12}"
          f"{'CPU ms/img':>12}  all runs img/s")
    for result in results:
        for key, label in labels.items():
            rates = result["rates"][key]
            runs = ", ".join(f"{rate:.1f}" for rate in rates)
            print(f"{result['model']:<12}{result['images']:>8}{label:>32}{max(rates):>12.1f}"
                  f"{min(result['cpu_ms'][key]):>12.1f}  {runs}")
        print(f"{'':<20}{'model load, not in the rows above':>32}"
              f"{result['load_seconds']:>11.1f}s")

    for result in results:
        ours = max(result["rates"]["ours"])
        for key, peer, target in [
                ("limit", "model alone on pre-decoded tensors", 0.85),
                ("peer", "CLEAR-style loop: decode in the main process, no workers", 1.0)]:
            peer_value = max(result["rates"][key])
            print(json.dumps({"benchmark": "clip", "metric": "images_per_second",
                              "model": result["model"], "ours": round(ours, 1), "peer": peer,
                              "peer_value": round(peer_value, 1),
                              "ratio": round(ours / peer_value, 2), "target": target,
                              "images": result["images"], "batch_size": args.batch_size,
                              "workers": args.workers, "jpeg_draft": args.jpeg_draft,
                              "device": "cpu", "machine": machine}))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="clear-tiny,ViT-B/32",
                        help="comma-separated models (default: clear-tiny,ViT-B/32)")
    parser.add_argument("--images", type=int, default=384,
                        help="photos in the bucket for clear-tiny (default: 384)")
    parser.add_argument("--large-model-images", type=int, default=96,
                        help="photos in the bucket for every other model, which runs far "
                        "slower on CPU (default: 96)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per forward pass in all measurements (default: 32)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of extract-clip (default: CPU cores, at "
                        "most 4)")
    parser.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction, default=True,
                        help="extract-clip's --jpeg-draft option (default: on, as in the "
                        "stage)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each measurement; the fastest counts (default: 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    machine = f"{os.cpu_count()} cores"
    results = []
    with tempfile.TemporaryDirectory(prefix="clear-bench-clip-") as tmp:
        for name in args.models.split(","):
            count = args.images if name == clip_models.TINY_MODEL else args.large_model_images
            results.append(benchmark_model(name, count, args, Path(tmp)))
    print_results(results, args, machine)


if __name__ == "__main__":
    main()
