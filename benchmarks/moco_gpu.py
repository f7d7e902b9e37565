"""Benchmark MoCo v2 training throughput on one CUDA GPU: ResNet-50 at 224 px, batch 256.

Builds `--images` real photographs (scikit-image's sample photos, at most 500 px on the
long side) into a shard tar and bucket manifest in a temporary artifact root, then
measures in one invocation:

- GPU data path: shard bytes read on the CPU, JPEGs decoded on the GPU by nvJPEG
  (`torchvision.io.decode_jpeg(device="cuda")`) and the aug+ augmentations applied to
  CUDA tensors with random parameters drawn per view. Only this script has that path:
  train-moco itself decodes with PIL and augments on the CPU in DataLoader workers.
- training step: the stage's `train_one_epoch` (bf16 autocast and channels-last on
  CUDA, K=65536, 8 batch-norm groups, SGD) on one pre-built batch.
- ours: both in one loop, so every step trains on a freshly decoded and augmented
  batch. These are the training images per second compared with the target of 1,500
  on one H100 or H200.
- stage loader: train-moco's own CPU DataLoader with `--workers` processes, to show
  whether the current stage keeps up with the step on this machine.
- peer: the MoCo v2 reference at about 168 images per second per V100, derived from
  the facebookresearch/moco README (ResNet-50, 200 ImageNet epochs of 1,281,167 images
  in 53 hours on 8 V100s). That figure is quoted, not measured here.

Requirements: Python 3.10 or later with torch 2.4 or later and torchvision 0.19 or
later built with CUDA (0.19 added batched nvJPEG decoding), pillow, numpy, pyarrow and
scikit-image. The script installs and downloads nothing. Run it from a checkout of
this repository:

    python benchmarks/moco_gpu.py                    # one CUDA GPU
    python benchmarks/moco_gpu.py --device cpu --tiny  # smoke test of the same code on CPU

The smoke mode trains resnet18 on 64 px crops for a few steps. Without `--device cpu`
and with no CUDA device visible, the script prints that it skipped and exits 0, so
`make bench` passes on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

# ImageNet images per epoch, epochs, hours and V100s of the MoCo v2 ResNet-50 row in
# the facebookresearch/moco README.
REFERENCE_IMAGES_PER_SECOND = 1_281_167 * 200 / (53 * 3600) / 8
TARGET_IMAGES_PER_SECOND = 1500.0

# The aug+ recipe of tasks.moco_data.build_augmentation, as parameter ranges.
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER_PROBABILITY = 0.8
JITTER_STRENGTH = 0.4  # brightness, contrast and saturation factors in [0.6, 1.4]
HUE_SHIFT = 0.1  # hue shifted by at most 0.1 of a turn
GRAYSCALE_PROBABILITY = 0.2
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.1, 2.0)
FLIP_PROBABILITY = 0.5
# Weights of torchvision's rgb_to_grayscale (ITU-R 601-2 luma).
LUMA = (0.2989, 0.587, 0.114)

FULL_SETTINGS = {"arch": "resnet50", "image_size": 224, "batch_size": 256, "images": 1024,
                 "steps": 20, "warmup_steps": 5, "queue_size": 65536, "bn_splits": 8}
TINY_SETTINGS = {"arch": "resnet18", "image_size": 64, "batch_size": 16, "images": 48,
                 "steps": 2, "warmup_steps": 1, "queue_size": 4096, "bn_splits": 2}


def grayscale(images):
    """Return the luma of `images` (N x 3 x H x W floats) as N x 1 x H x W."""
    red, green, blue = images.unbind(dim=1)
    return (LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue).unsqueeze(1)


def rgb_to_hsv(images):
    """Convert N x 3 x H x W RGB floats in [0, 1] to HSV with hue in [0, 1)."""
    import torch

    red, green, blue = images.unbind(dim=1)
    minimum, maximum = torch.aminmax(images, dim=1)
    chroma = maximum - minimum
    gray = chroma == 0
    saturation = chroma / torch.where(gray, torch.ones_like(maximum), maximum)
    divisor = torch.where(gray, torch.ones_like(chroma), chroma)
    red_c = (maximum - red) / divisor
    green_c = (maximum - green) / divisor
    blue_c = (maximum - blue) / divisor
    is_red = maximum == red
    is_green = (maximum == green) & ~is_red
    is_blue = ~is_red & ~is_green
    hue = (is_red * (blue_c - green_c) + is_green * (2.0 + red_c - blue_c)
           + is_blue * (4.0 + green_c - red_c))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, maximum), dim=1)


def hsv_to_rgb(images):
    """Convert N x 3 x H x W HSV floats (hue in [0, 1)) back to RGB in [0, 1]."""
    import torch

    hue, saturation, value = images.unbind(dim=1)
    sector_float = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector_float
    sector = sector_float.to(torch.long) % 6
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    # Channel sources per hue sector, as indices into (value, p, q, t).
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]],
                         device=images.device)
    candidates = torch.stack((value, p, q, t), dim=1)  # N x 4 x H x W
    select = table[:, sector].movedim(0, 1)  # N x 3 x H x W
    return candidates.gather(1, select)


def color_jitter(images, factors, order: tuple[int, ...]):
    """Apply brightness, contrast, saturation and hue changes in `order` to a group of views.

    `factors` is N x 4 (three multiplicative factors, then the hue shift), one row per
    view. The formulas are torchvision's tensor ColorJitter with per-view factors.
    """
    import torch

    brightness, contrast, saturation, hue = (column.view(-1, 1, 1, 1)
                                             for column in factors.unbind(dim=1))
    for operation in order:
        if operation == 0:
            images = (images * brightness).clamp(0.0, 1.0)
        elif operation == 1:
            mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
            images = (contrast * images + (1.0 - contrast) * mean).clamp(0.0, 1.0)
        elif operation == 2:
            images = (saturation * images + (1.0 - saturation) * grayscale(images)).clamp(0.0, 1.0)
        else:
            hsv = rgb_to_hsv(images)
            shifted_hue = (hsv[:, :1] + hue).remainder(1.0)
            images = hsv_to_rgb(torch.cat((shifted_hue, hsv[:, 1:]), dim=1))
    return images


def gaussian_blur(images, sigma):
    """Blur each view with its own Gaussian standard deviation `sigma` (a vector, pixels)."""
    import torch
    import torch.nn.functional as F

    radius = math.ceil(3 * BLUR_SIGMA[1])
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    count, channels, height, width = images.shape
    weight = kernels.repeat_interleave(channels, dim=0)  # one kernel per view and channel
    flat = F.pad(images.reshape(1, count * channels, height, width), (radius,) * 4,
                 mode="reflect")
    flat = F.conv2d(flat, weight.view(count * channels, 1, 1, -1), groups=count * channels)
    flat = F.conv2d(flat, weight.view(count * channels, 1, -1, 1), groups=count * channels)
    return flat.view(count, channels, height, width)


class TensorAugPlus:
    """MoCo v2's aug+ on decoded uint8 images on any device, with parameters drawn per view.

    Follows tasks.moco_data.build_augmentation step by step (random resized crop,
    colour jitter with p=0.8 in a random order per view, grayscale with p=0.2,
    Gaussian blur with sigma in [0.1, 2.0] and p=0.5, horizontal flip, ImageNet
    normalisation), with torchvision's tensor formulas instead of PIL's. The blur
    truncates the Gaussian at 3 sigma and pads by reflection. Random parameters come
    from `generator` on the CPU and move to the device in one copy per batch.
    """

    def __init__(self, image_size: int, device, generator):
        import torch

        from tasks.moco_data import IMAGENET_MEAN, IMAGENET_STD

        self.image_size = image_size
        self.device = device
        self.generator = generator
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw (top, left, height, width) as torchvision's RandomResizedCrop.get_params does."""
        import torch

        area = height * width
        log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*CROP_SCALE,
                                                         generator=self.generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio,
                                                      generator=self.generator).item())
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = torch.randint(0, height - crop_height + 1, (1,),
                                    generator=self.generator).item()
                left = torch.randint(0, width - crop_width + 1, (1,),
                                     generator=self.generator).item()
                return top, left, crop_height, crop_width
        # Fall back to a central crop clamped to the ratio range.
        ratio = width / height
        if ratio < CROP_RATIO[0]:
            crop_width, crop_height = width, round(width / CROP_RATIO[0])
        elif ratio > CROP_RATIO[1]:
            crop_height, crop_width = height, round(height * CROP_RATIO[1])
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def resized_crops(self, images: list) -> object:
        """Crop and resize each image twice; return 2N x 3 x S x S floats in [0, 1]."""
        import torch
        import torch.nn.functional as F

        size = (self.image_size, self.image_size)
        crops = []
        for _view in range(2):
            for image in images:
                top, left, height, width = self.crop_box(image.shape[-2], image.shape[-1])
                crop = image[:, top:top + height, left:left + width].unsqueeze(0).float()
                crops.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False,
                                           antialias=True))
        return torch.cat(crops).div_(255.0).clamp_(0.0, 1.0)

    def __call__(self, images: list):
        """Return the query views and the key views of `images` (uint8 3 x H x W tensors)."""
        import torch

        views = self.resized_crops(images)
        count = views.shape[0]
        generator = self.generator

        jitter = torch.rand(count, generator=generator) < JITTER_PROBABILITY
        factors = torch.empty(count, 4)
        factors[:, :3].uniform_(1 - JITTER_STRENGTH, 1 + JITTER_STRENGTH, generator=generator)
        factors[:, 3].uniform_(-HUE_SHIFT, HUE_SHIFT, generator=generator)
        orders = [tuple(torch.randperm(4, generator=generator).tolist()) for _ in range(count)]
        gray = torch.rand(count, generator=generator) < GRAYSCALE_PROBABILITY
        blur = torch.rand(count, generator=generator) < BLUR_PROBABILITY
        sigma = torch.empty(count).uniform_(*BLUR_SIGMA, generator=generator)
        flip = torch.rand(count, generator=generator) < FLIP_PROBABILITY
        factors = factors.to(self.device)
        sigma = sigma.to(self.device)

        # Views that share an order of the four jitter operations are changed together.
        groups = defaultdict(list)
        for index in torch.nonzero(jitter).flatten().tolist():
            groups[orders[index]].append(index)
        for order, members in groups.items():
            index = torch.tensor(members, device=self.device)
            views[index] = color_jitter(views[index], factors[index], order)

        if gray.any():
            index = torch.nonzero(gray).flatten().to(self.device)
            views[index] = grayscale(views[index]).expand(-1, 3, -1, -1)
        if blur.any():
            index = torch.nonzero(blur).flatten().to(self.device)
            views[index] = gaussian_blur(views[index], sigma[index])
        if flip.any():
            index = torch.nonzero(flip).flatten().to(self.device)
            views[index] = views[index].flip(-1)

        views = (views - self.mean) / self.std
        if views.device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        return views[:count // 2], views[count // 2:]


class TensorDataPath:
    """Batches of two views from a bucket: bytes from the shard, decode and aug+ on `device`.

    NOTE: nvJPEG ignores EXIF orientation, which the stage applies through
    `decode_image`. The benchmark photos have none.
    """

    def __init__(self, artifact_root: str, image_size: int, batch_size: int, device, seed: int):
        import torch

        from tasks.moco_data import BucketDataset, bucket_manifest_key
        from tasks.storage import ArtifactStore

        store = ArtifactStore(artifact_root)
        self.dataset = BucketDataset(store, bucket_manifest_key(store, "default", "0"),
                                     transform=None)
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = TensorAugPlus(image_size, device, self.generator)
        self.order: list[int] = []

    def decode(self, payloads: list[bytes]) -> list:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(payload), dtype=torch.uint8) for payload in payloads]
        if self.device.type == "cuda":
            # torchvision's CUDA decode_jpeg writes its outputs on a private stream that
            # does not wait for the caller's stream, so it can overwrite freed memory that
            # queued kernels still read (pytorch/vision pull request 9606). Draining the
            # stream first leaves nothing queued to overwrite.
            torch.cuda.current_stream(self.device).synchronize()
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def next_batch(self):
        import torch

        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        indices, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        dataset = self.dataset
        payloads = [dataset.reader.read(dataset.shards[i], dataset.offsets[i], dataset.sizes[i])
                    for i in indices]
        return self.augment(self.decode(payloads))


class Batches:
    """`steps` batches from a data path, in the (len, iter) form train_one_epoch reads."""

    def __init__(self, data_path: TensorDataPath, steps: int):
        self.data_path = data_path
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.data_path.next_batch()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device) -> float:
    """Run `function`, wait for the device, and return the seconds it took."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def measure_training(config, context, data_path: TensorDataPath, steps: int,
                     warmup_steps: int) -> tuple[float, float, float]:
    """Time the stage's `train_one_epoch` on one pre-built batch, then fed by `data_path`.

    Returns (seconds for `steps` steps on the pre-built batch, seconds for `steps` steps
    that each decode and augment a new batch, peak GPU memory in GiB or NaN on CPU).
    """
    import torch

    from tasks.moco import build_training_model, train_one_epoch

    device = torch.device(context.device)
    model, optimizer, scaler = build_training_model(config, context)

    def run_steps(batches) -> None:
        train_one_epoch(model, batches, optimizer, scaler, config, context, 0, config.lr, None)

    batch = data_path.next_batch()
    run_steps([batch] * warmup_steps)
    step_seconds = timed(lambda: run_steps([batch] * steps), device)
    end_to_end_seconds = timed(lambda: run_steps(Batches(data_path, steps)), device)
    peak_gib = (torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda" else float("nan"))
    return step_seconds, end_to_end_seconds, peak_gib


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="device of the data path and the step; auto uses CUDA and skips "
                        "without it (default: auto)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke-test settings: resnet18, 64 px, batch 16, 2 timed steps")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="worker processes of the stage's CPU DataLoader (default: the "
                        "number of cores)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps of each measurement (default: 20, or 2 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    settings = dict(TINY_SETTINGS if args.tiny else FULL_SETTINGS)
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        settings["steps"] = args.steps
    args.settings = settings
    return args


def main() -> None:
    args = parse_args()
    settings = args.settings

    import torch

    if args.device == "auto" and not torch.cuda.is_available():
        print("moco_gpu benchmark skipped: no CUDA device is visible; run with --device cpu "
              "--tiny for the CPU smoke test")
        return

    from benchmarks.moco import build_bucket, measure_loader
    from tasks.distributed import init_distributed
    from tasks.moco import Config

    context = init_distributed("cuda" if args.device == "auto" else args.device)
    device = torch.device(context.device)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="clear-bench-moco-gpu-") as artifact_root:
        bucket_mib = build_bucket(artifact_root, settings["images"], max_side=500)
        config = Config(artifact_root=artifact_root, run="bench", arch=settings["arch"],
                        queue_size=settings["queue_size"], batch_size=settings["batch_size"],
                        image_size=settings["image_size"], workers=args.workers,
                        bn_splits=settings["bn_splits"], seed=args.seed, device=args.device,
                        log_every=10**9)
        steps = settings["steps"]
        batch_size = settings["batch_size"]
        data_path = TensorDataPath(artifact_root, settings["image_size"], batch_size, device,
                                   args.seed)

        data_path.next_batch()  # warm-up: nvJPEG handles, kernels
        data_seconds = timed(lambda: [data_path.next_batch() for _ in range(steps)], device)
        step_seconds, end_to_end_seconds, peak_gib = measure_training(
            config, context, data_path, steps, settings["warmup_steps"])
        stage_loader_rate, _, _, _ = measure_loader(config)

    images = steps * batch_size
    data_rate = images / data_seconds
    step_rate = images / step_seconds
    training_rate = images / end_to_end_seconds
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    machine = f"{device_name}, {os.cpu_count()} cores"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    setup = (f"{settings['arch']}, {settings['image_size']} px, batch {batch_size}, "
             f"{precision}")

    print(f"moco_gpu benchmark: {settings['images']} photos ({bucket_mib:.1f} MiB of JPEG, at "
          f"most 500 px), {setup}, {steps} timed steps, {machine}")
    print(f"{'measurement':<60}{'images/s':>10}")
    rows = [(f"tensor data path (decode + 2 views) on {device.type}", data_rate),
            ("training step on pre-built batch (stage train_one_epoch)", step_rate),
            ("ours: data path + training step, one loop", training_rate),
            (f"stage CPU DataLoader, {args.workers} workers", stage_loader_rate),
            ("MoCo v2 reference per V100 (quoted)", REFERENCE_IMAGES_PER_SECOND)]
    for label, rate in rows:
        print(f"{label:<60}{rate:>10.1f}")
    print(f"peak GPU memory: {peak_gib:.1f} GiB; target: {TARGET_IMAGES_PER_SECOND:.0f} "
          f"training images/s on one H100 or H200")

    reference = "MoCo v2 reference, 1 V100 (facebookresearch/moco README: 200 epochs, 53 h, 8 GPUs)"
    comparisons = [
        ("training_images_per_second", training_rate, reference, REFERENCE_IMAGES_PER_SECOND,
         TARGET_IMAGES_PER_SECOND / REFERENCE_IMAGES_PER_SECOND),
        ("gpu_data_path_images_per_second", data_rate, f"training step demand ({setup})",
         step_rate, 1.0),
        ("stage_loader_images_per_second", stage_loader_rate, f"training step demand ({setup})",
         step_rate, 1.0),
    ]
    for metric, ours, peer, peer_value, target in comparisons:
        print(json.dumps({"benchmark": "moco", "metric": metric, "ours": round(ours, 1),
                          "peer": peer, "peer_value": round(peer_value, 1),
                          "ratio": round(ours / peer_value, 2), "target": round(target, 2),
                          "tiny": args.tiny, "machine": machine}))


if __name__ == "__main__":
    main()
