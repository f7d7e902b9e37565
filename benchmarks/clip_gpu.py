"""Benchmark CLIP embedding on one GPU: images per second end to end from shard tars.

Measures ViT-B/32 and RN50 on the same bucket of JPEGs in one invocation:

- gpu-decode (ours): DataLoader workers read the JPEG bytes from the shard tar. The
  main process decodes each batch on the GPU with nvJPEG
  (`torchvision.io.decode_jpeg(..., device="cuda")`) and applies the EXIF orientation
  recorded in the bucket manifest. It then resizes, center-crops and normalizes on the
  GPU as the model's own transform does, and embeds under bf16 autocast (channels_last
  for RN50). Embeddings are copied back to the host and L2-normalized, but not written.
- extract-clip: the stage's `run()` as shipped, which decodes and resizes with Pillow
  in DataLoader workers, embeds and writes chunks (`--workers` processes).
- model alone: the forward pass on batches that are already on the GPU, the limit.

Target: at least 5,000 images per second end to end for ViT-B/32 on one H100 or H200.
For scale, clip-retrieval reports about 2,500 per A100, limited by resizing on the CPU
(a reported figure, not measured here).

The photos are 70 distinct crops of scikit-image's bundled photographs (from
`tests/builders.py`), 500 px on the long side like Flickr's medium size, baseline
JPEGs at quality 90, repeated to `--images` samples in one shard tar. The models have
random weights (open_clip configs with `pretrained=None`, saved once as a checkpoint
file for the stage), because throughput does not depend on the weights and the
machine cannot reach a model hub.

Requirements: a CUDA build of torch and torchvision with nvJPEG (the default Linux
wheels), open_clip_torch, pillow, numpy, pyarrow and scikit-image. The script installs
nothing and needs no network. From the repository root, either reuse an environment
that has those packages or install the pinned versions where a package index is
reachable:

    python -m venv .venv && .venv/bin/pip install -r requirements/lock.txt
    .venv/bin/python benchmarks/clip_gpu.py

The run itself should take one to two minutes on one H100 or H200 (an estimate: it
builds 8,192 JPEGs, then makes 3 passes of 3 measurements for each model).

Smoke test of the same code paths on CPU, with 16 images (under a minute on 2 cores):

    .venv/bin/python benchmarks/clip_gpu.py --device cpu --tiny

Every run also checks GpuPreprocess against the model's own Pillow transform on the
first batch and prints the mean absolute difference of the model inputs in 8-bit
levels. nvJPEG and libjpeg, and bicubic resizing in torch and in Pillow, differ
slightly, so expect a small value above zero (0.15 on CPU with torchvision 0.29.1).

Prints a table, then one JSON object per comparison.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "tests")]

from tasks import clip, clip_models  # noqa: E402
from tasks.images import ShardReader  # noqa: E402
from tasks.storage import ArtifactStore  # noqa: E402

from builders import make_jpeg, write_bucket, write_shard  # noqa: E402

FLICKR_MEDIUM_SIDE = 500
SPLIT, BUCKET, SHARD = "default", "0", "00000"
FIRST_PHOTO_ID = 10_000
MODELS = ["ViT-B/32", "RN50"]
TARGET_IMAGES_PER_SECOND = {"ViT-B/32": 5000.0}


@functools.cache
def photo_bytes(variant: int) -> bytes:
    return make_jpeg(variant, FLICKR_MEDIUM_SIDE)


def build_bucket(root: Path, count: int) -> ArtifactStore:
    # make_jpeg gives equal bytes for photo ids with equal photo_id % 70.
    store = ArtifactStore(str(root))
    photo_ids = list(range(FIRST_PHOTO_ID, FIRST_PHOTO_ID + count))
    write_shard(store, SHARD, {photo_id: photo_bytes(photo_id % 70) for photo_id in photo_ids})
    write_bucket(store, SPLIT, BUCKET, SHARD, photo_ids)
    return store


def read_rows(store: ArtifactStore) -> list[dict]:
    import pyarrow.parquet as pq

    key = clip.bucket_manifest_key(SPLIT, BUCKET)
    table = pq.read_table(io.BytesIO(store.read_bytes(key)),
                          columns=["photo_id", "shard", "offset", "bytes", "orientation"])
    return table.to_pylist()


def write_random_checkpoint(name: str, folder: Path) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(clip_models.resolve_model_name(name), pretrained=None)
    path = folder / f"{clip_models.model_slug(name)}.pt"
    torch.save(model.state_dict(), path)
    return path


class GpuTransform:
    """The model's inference transform (resize the short side, center-crop, normalize) for
    decoded uint8 CHW tensors, run on the tensors' device."""

    def __init__(self, preprocess, device: str):
        import torch
        from torchvision import transforms

        steps = {type(step).__name__: step for step in preprocess.transforms}
        resize, crop, normalize = steps.get("Resize"), steps.get("CenterCrop"), \
            steps.get("Normalize")
        if resize is None or crop is None or normalize is None or \
                not isinstance(resize.size, int) or \
                resize.interpolation != transforms.InterpolationMode.BICUBIC:
            raise SystemExit(f"error: expected Resize(int, bicubic), CenterCrop and Normalize in "
                             f"the model's transform, got {preprocess}")
        self.size = resize.size
        self.crop = tuple(crop.size)
        self.mean = torch.tensor(normalize.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(normalize.std, device=device).view(1, 3, 1, 1) * 255

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        # torchvision's rule: the short side becomes `size`, the long side is truncated.
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, images: list):
        """Return one normalized float32 NCHW batch, in the order of `images`."""
        import torch
        import torch.nn.functional as F

        crop_height, crop_width = self.crop
        output = torch.empty((len(images), 3, crop_height, crop_width), dtype=torch.float32,
                             device=self.mean.device)
        # Flickr photos come in few sizes, so images of equal size are resized together.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape[1:]), []).append(index)
        for (height, width), indices in by_shape.items():
            batch = torch.stack([images[i] for i in indices]).float()
            new_height, new_width = self.resized_shape(height, width)
            if (new_height, new_width) != (height, width):
                batch = F.interpolate(batch, size=(new_height, new_width), mode="bicubic",
                                      antialias=True, align_corners=False)
            # Round and clamp like the uint8 image that Pillow's resize returns.
            batch = batch.clamp_(0, 255).round_()
            top = int(round((new_height - crop_height) / 2.0))
            left = int(round((new_width - crop_width) / 2.0))
            output[indices] = batch[:, :, top:top + crop_height, left:left + crop_width]
        return output.sub_(self.mean).div_(self.std)


def apply_orientation(image, orientation: int | None):
    """Rotate or flip a CHW tensor as PIL.ImageOps.exif_transpose does for EXIF tag 274."""
    import torch

    if orientation in (None, 1):
        return image
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, k=-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, k=1, dims=(-2, -1))
    return image


def decode_batch(encoded: list, device: str) -> tuple[list, list[str | None]]:
    """Decode JPEG byte tensors to RGB uint8 CHW tensors on `device`, without EXIF rotation.

    Returns the images (None where decoding failed) and the errors (None where it
    worked). nvJPEG fails a whole batch on one bad or non-JPEG image, so a failed batch
    is decoded again one image at a time, with Pillow for images nvJPEG cannot read.
    """
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), [None] * len(encoded)
    except RuntimeError:
        pass
    images, errors = [], []
    for data in encoded:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            errors.append(None)
            continue
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                array = np.asarray(image.convert("RGB"))
            images.append(torch.from_numpy(array).permute(2, 0, 1).contiguous().to(device))
            errors.append(None)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            images.append(None)
            errors.append(f"{type(error).__name__}: {error}")
    return images, errors


class GpuPreprocess:
    """Decode, orient and transform one batch of JPEGs into model input on `device`.

    torchvision 0.29's `decode_jpeg(..., device="cuda")` writes its outputs on a private
    stream without waiting for work queued on the caller's stream, so it can overwrite
    freshly freed memory that queued kernels still read
    (https://github.com/pytorch/vision/pull/9606). The decode and the transform therefore
    run on their own stream, which is synchronized before each decode and never runs
    model work. The model stream waits for that stream, so decoding the next batch still
    overlaps with the model.
    """

    def __init__(self, transform: GpuTransform, device: str):
        import torch

        self.transform = transform
        self.device = device
        self.stream = torch.cuda.Stream() if device == "cuda" else None

    def __call__(self, encoded: list, orientations: list) -> tuple:
        """Return the model input batch of the decodable images and each image's error."""
        import torch

        if self.stream is None:
            return self._preprocess(encoded, orientations)
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            images, errors = self._preprocess(encoded, orientations)
        compute = torch.cuda.current_stream()
        compute.wait_stream(self.stream)
        images.record_stream(compute)
        return images, errors

    def _preprocess(self, encoded: list, orientations: list) -> tuple:
        decoded, errors = decode_batch(encoded, self.device)
        ok = [i for i, error in enumerate(errors) if error is None]
        images = self.transform([apply_orientation(decoded[i], orientations[i]) for i in ok])
        return images, errors


class EncodedImages:
    """Map-style dataset of (photo id, JPEG bytes, EXIF orientation) over bucket rows."""

    def __init__(self, rows: list[dict], reader: ShardReader):
        self.rows = rows
        self.reader = reader

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        return row["photo_id"], self.reader.read(row["shard"], row["offset"], row["bytes"]), \
            row["orientation"]


def collate_encoded(samples) -> tuple[list, object, list[int], list]:
    """Join a batch's JPEGs into one uint8 tensor, so that a worker sends one shared
    memory block per batch instead of one per image."""
    import torch

    ids, datas, orientations = (list(column) for column in zip(*samples, strict=True))
    joined = torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8)
    return ids, joined, [len(data) for data in datas], orientations


def split_encoded(joined, sizes: list[int]) -> list:
    """Return one contiguous 1-D view per JPEG of a joined batch."""
    import torch

    return list(torch.split(joined, sizes))


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def embed(model, images, device: str, precision: str, channels_last: bool):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype,
                                         enabled=dtype is not None):
        return model.encode_image(images).float()


def time_gpu_decode(store: ArtifactStore, rows: list[dict], loaded, preprocess: GpuPreprocess,
                    args: argparse.Namespace, device: str, precision: str,
                    channels_last: bool) -> float:
    """Embed the bucket with decoding and resizing on `device`; return seconds."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    batches = [list(range(start, min(start + args.batch_size, len(rows))))
               for start in range(0, len(rows), args.batch_size)]
    loader = DataLoader(EncodedImages(rows, ShardReader(store)), batch_sampler=batches,
                        num_workers=args.read_workers, collate_fn=collate_encoded,
                        prefetch_factor=4 if args.read_workers else None)
    start = time.perf_counter()
    features, embedded_ids, failed = [], [], 0
    for ids, joined, sizes, orientations in loader:
        images, errors = preprocess(split_encoded(joined, sizes), orientations)
        ok = [i for i, error in enumerate(errors) if error is None]
        failed += len(errors) - len(ok)
        features.append(embed(loaded.model, images, device, precision, channels_last))
        embedded_ids.extend(ids[i] for i in ok)
    raw = torch.cat(features).cpu()
    F.normalize(raw, dim=-1)
    seconds = time.perf_counter() - start
    if failed or len(embedded_ids) != len(rows):
        raise SystemExit(f"error: gpu-decode embedded {len(embedded_ids)} of {len(rows)} "
                         f"images, {failed} failed to decode")
    return seconds


def time_stage(store: ArtifactStore, loaded, checkpoint: Path, args: argparse.Namespace,
               device: str) -> float:
    """Run extract-clip on the bucket with the already loaded model; return seconds."""
    shutil.rmtree(store.path / "features", ignore_errors=True)
    config = clip.Config(artifact_root=store.root, split=SPLIT, bucket=BUCKET, model=loaded.name,
                         checkpoint=str(checkpoint), batch_size=args.batch_size,
                         workers=args.stage_workers, device=device, precision="auto")
    real_load_clip = clip_models.load_clip
    # run() imports load_clip from tasks.clip_models when it is called, so this hands it
    # the model that the other measurements use.
    clip_models.load_clip = lambda *args, **kwargs: loaded
    try:
        start = time.perf_counter()
        summary = clip.run(config)
        seconds = time.perf_counter() - start
    finally:
        clip_models.load_clip = real_load_clip
    if summary["samples"] != len(read_rows(store)):
        raise SystemExit(f"error: extract-clip embedded {summary['samples']} samples, "
                         f"expected every sample of the bucket: {summary}")
    return seconds


def time_model_alone(loaded, batches: list, device: str, precision: str,
                     channels_last: bool) -> float:
    start = time.perf_counter()
    for images in batches:
        embed(loaded.model, images, device, precision, channels_last)
    synchronize(device)
    return time.perf_counter() - start


def compare_with_pillow_transform(loaded, preprocess: GpuPreprocess, encoded: list) -> float:
    """Return the mean absolute difference, in 8-bit levels, between the model inputs that
    GpuPreprocess and the model's own Pillow transform make from the same JPEGs."""
    import torch

    from tasks.images import decode_image

    ours, _ = preprocess(encoded, [None] * len(encoded))
    pillow = torch.stack([loaded.preprocess(decode_image(data.numpy().tobytes()))
                          for data in encoded]).to(ours.device)
    return float(((ours - pillow) * preprocess.transform.std).abs().mean())


def benchmark_model(name: str, store: ArtifactStore, rows: list[dict],
                    args: argparse.Namespace, device: str, tmp: Path) -> dict:
    import torch

    checkpoint = write_random_checkpoint(name, tmp)
    loaded = clip_models.load_clip(name, checkpoint=str(checkpoint), device=device)
    precision = clip.resolve_precision("auto", device)
    channels_last = name.startswith("RN")
    if channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    preprocess = GpuPreprocess(GpuTransform(loaded.preprocess, device), device)

    # Warm up nvJPEG, cuDNN and autocast, and keep decoded batches for "model alone".
    reader = ShardReader(store)
    encoded = [torch.frombuffer(bytearray(reader.read(r["shard"], r["offset"], r["bytes"])),
                                dtype=torch.uint8) for r in rows]
    reader.close()
    batches = []
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start:start + args.batch_size]
        batches.append(preprocess(batch, [None] * len(batch))[0])
    embed(loaded.model, batches[0], device, precision, channels_last)
    difference = compare_with_pillow_transform(loaded, preprocess, encoded[:args.batch_size])

    seconds: dict[str, list[float]] = {"ours": [], "stage": [], "limit": []}
    for _ in range(args.repeats):
        seconds["ours"].append(time_gpu_decode(store, rows, loaded, preprocess, args, device,
                                               precision, channels_last))
        seconds["stage"].append(time_stage(store, loaded, checkpoint, args, device))
        seconds["limit"].append(time_model_alone(loaded, batches, device, precision,
                                                 channels_last))
    checkpoint.unlink()
    return {"model": name, "precision": precision, "difference": difference,
            "rates": {key: [len(rows) / s for s in values] for key, values in seconds.items()}}


def describe_machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} cores"
    return f"CPU only, {os.cpu_count()} cores"


def print_results(results: list[dict], args: argparse.Namespace, device: str) -> None:
    import torch
    import torchvision

    machine = describe_machine(device)
    labels = {"ours": f"gpu-decode on {device}",
              "stage": f"extract-clip, {args.stage_workers} workers",
              "limit": "model alone, pre-decoded"}
    print(f"CLIP embedding benchmark: {args.images} images, batch size {args.batch_size}, "
          f"{machine}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"best of {args.repeats}")
    print(f"{'model':<10}{'precision':>10}{'measurement':>36}{'best img/s':>12}  all runs img/s")
    for result in results:
        for key, label in labels.items():
            rates = result["rates"][key]
            runs = ", ".join(f"{rate:.0f}" for rate in rates)
            print(f"{result['model']:<10}{result['precision']:>10}{label:>36}"
                  f"{max(rates):>12.0f}  {runs}")
        print(f"{'':<20}{'input mean |diff| vs Pillow, levels':>36}"
              f"{result['difference']:>12.2f}")

    for result in results:
        ours = max(result["rates"]["ours"])
        comparisons = [("model alone on pre-decoded tensors", max(result["rates"]["limit"]),
                        0.85),
                       ("extract-clip with Pillow decoding in DataLoader workers",
                        max(result["rates"]["stage"]), 1.0)]
        if result["model"] in TARGET_IMAGES_PER_SECOND:
            comparisons.append(("required rate on one H100 or H200",
                                TARGET_IMAGES_PER_SECOND[result["model"]], 1.0))
        for peer, peer_value, target in comparisons:
            print(json.dumps({"benchmark": "clip_gpu", "metric": "images_per_second",
                              "model": result["model"], "ours": round(ours, 1), "peer": peer,
                              "peer_value": round(peer_value, 1),
                              "ratio": round(ours / peer_value, 2), "target": target,
                              "images": args.images, "batch_size": args.batch_size,
                              "precision": result["precision"],
                              "input_mean_abs_diff_levels": round(result["difference"], 2),
                              "device": device, "machine": machine}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="where to decode and embed; auto picks cuda and skips the "
                        "benchmark when there is none (default: auto)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: 16 images, batch size 8, one repeat, 2 stage "
                        "workers; overrides those options")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated models (default: {','.join(MODELS)})")
    parser.add_argument("--images", type=int, default=8192,
                        help="JPEGs in the bucket (default: 8192)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per forward pass (default: 256)")
    parser.add_argument("--read-workers", type=int, default=4,
                        help="DataLoader workers that read JPEG bytes for gpu-decode "
                        "(default: 4)")
    parser.add_argument("--stage-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers of extract-clip (default: CPU cores, at "
                        "most 16)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement; the fastest counts (default: 3)")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.batch_size, args.repeats = 16, 8, 1
        args.read_workers, args.stage_workers = 1, 2
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    import torch

    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print("clip_gpu: torch finds no CUDA device, so the GPU benchmark is skipped; "
                  "run `python benchmarks/clip_gpu.py --device cpu --tiny` for a CPU smoke test")
            return
        device = "cuda"
    device = clip.resolve_device(device)
    torch.backends.cudnn.benchmark = True

    results = []
    with tempfile.TemporaryDirectory(prefix="clear-bench-clip-gpu-") as tmp:
        store = build_bucket(Path(tmp) / "root", args.images)
        rows = read_rows(store)
        for name in args.models.split(","):
            results.append(benchmark_model(name, store, rows, args, device, Path(tmp)))
    print_results(results, args, device)


if __name__ == "__main__":
    main()
