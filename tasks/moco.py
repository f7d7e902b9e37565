"""train-moco: pre-train MoCo v2 on the unlabeled images of one bucket.

Trains MoCo v2 (ResNet encoder with an MLP head, a queue of K negative keys, a
momentum key encoder with momentum m, InfoNCE loss at temperature T) on every sample
of `buckets/<split>/bucket-<id>.parquet`, with the published defaults: resnet50,
128-d embeddings, K=65536, m=0.999, T=0.2, SGD with lr 0.03, momentum 0.9, weight
decay 1e-4, global batch 256, a per-epoch cosine learning-rate schedule, and the
"aug+" augmentations.

Distributed: start it with `torchrun --nproc_per_node N -m tasks -- train-moco ...`; the
`--` stops torchrun's parser from taking `--run` for an abbreviation of its `--run-path`.
Each process trains on 1/N of every global batch (DDP; NCCL on GPU, Gloo on CPU).
Batch norm never computes statistics over a query together with its positive key,
because keys are encoded in an order shuffled across all processes, as in the MoCo
reference. A single process has no other devices to shuffle to, so both encoders
compute batch norm over `--bn-splits` groups of the batch and the keys are shuffled
between groups. On GPU the encoders run
channels-last under bf16 autocast (`--precision`).

Outputs under `models/moco/<run>/`: `options.json` (the options the run was started
with; once a checkpoint exists, a restart with other options fails),
`checkpoint_NNNN.pth.tar` after every epoch (NNNN is the 0-based epoch index, as in the
MoCo reference; keys `epoch` (epochs completed), `arch`, `state_dict` (keys
`module.encoder_q.*`, `module.encoder_k.*`, `module.queue`), `optimizer`, `scaler`,
`rng_state`, `options`, `loss`), and with
`--tensorboard` event files in `tensorboard/`. A restarted run resumes from the latest
checkpoint, so an Airflow retry continues training. Every epoch re-seeds the Python,
NumPy and torch RNGs (and through torch the DataLoader workers) from (seed, epoch,
rank), so a resumed run repeats the steps an uninterrupted run would take, on every
rank. `rng_state` therefore only records rank 0's generator states at the end of the
epoch, for inspection and for tools that expect the key; a resume does not restore it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ConfigError, StageError
from tasks.options import require_minimum
from tasks.storage import ArtifactStore

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# torchvision ResNet variants; any of them can be the MoCo encoder.
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                "wide_resnet50_2", "wide_resnet101_2")
# Options that change how the run trains. A restart must repeat them exactly; the rest
# (workers, device, logging) may change between restarts.
TRAINING_OPTIONS = ("split", "bucket", "arch", "dim", "queue_size", "momentum_encoder",
                    "temperature", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                    "image_size", "max_steps_per_epoch", "seed", "bn_splits")


@dataclass(frozen=True)
class Config:
    artifact_root: str
    run: str
    split: str = "default"
    bucket: str = "0"
    arch: str = "resnet50"
    dim: int = 128
    queue_size: int = 65536
    momentum_encoder: float = 0.999
    temperature: float = 0.2
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 224
    workers: int = 4
    max_steps_per_epoch: int | None = None
    seed: int = 0
    bn_splits: int = 8
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    tensorboard: bool = False
    cache_dir: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if not RUN_NAME_PATTERN.match(args.run):
            raise ConfigError(f"--run {args.run!r} is not a valid run name; use letters, "
                              "digits, '.', '_' and '-'")
        if args.arch not in RESNET_ARCHS:
            raise ConfigError(f"--arch {args.arch!r} is not supported; valid choices: "
                              f"{', '.join(RESNET_ARCHS)}")
        positive = {"--dim": args.dim, "--queue-size": args.queue_size, "--epochs": args.epochs,
                    "--batch-size": args.batch_size, "--image-size": args.image_size,
                    "--log-every": args.log_every, "--bn-splits": args.bn_splits}
        require_minimum({**positive, "--max-steps-per-epoch": args.max_steps_per_epoch})
        if args.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
        if args.queue_size < args.batch_size:
            raise ConfigError(f"--queue-size ({args.queue_size}) must be at least --batch-size "
                              f"({args.batch_size}) so one batch of keys fits in the queue")
        real_valued = {"--lr": args.lr, "--momentum": args.momentum,
                       "--weight-decay": args.weight_decay,
                       "--temperature": args.temperature,
                       "--momentum-encoder": args.momentum_encoder}
        for option, value in real_valued.items():
            if not math.isfinite(value):
                raise ConfigError(f"{option} must be a finite number, got {value}")
        if not 0.0 <= args.momentum_encoder < 1.0:
            raise ConfigError(f"--momentum-encoder must be in [0, 1), got {args.momentum_encoder}")
        if args.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {args.temperature}")
        if args.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {args.lr}")
        if args.weight_decay < 0 or args.momentum < 0:
            raise ConfigError("--weight-decay and --momentum must not be negative")
        return cls(args.artifact_root, args.run, args.split, args.bucket, args.arch, args.dim,
                   args.queue_size, args.momentum_encoder, args.temperature, args.epochs,
                   args.batch_size, args.lr, args.momentum, args.weight_decay, args.image_size,
                   args.workers, args.max_steps_per_epoch, args.seed, args.bn_splits,
                   args.device, args.precision, args.log_every, args.tensorboard,
                   args.cache_dir)

    def training_options(self) -> dict:
        values = dataclasses.asdict(self)
        return {name: values[name] for name in TRAINING_OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True,
                        help="run name; outputs go to models/moco/<run>/")
    parser.add_argument("--split", default="default",
                        help="bucket split written by the segment stage (default: default)")
    parser.add_argument("--bucket", default="0",
                        help="id of the bucket whose images are trained on (default: 0)")
    parser.add_argument("--arch", default="resnet50",
                        help="torchvision ResNet of the encoder (default: resnet50)")
    parser.add_argument("--dim", type=int, default=128,
                        help="embedding size of the projection head (default: 128)")
    parser.add_argument("--queue-size", type=int, default=65536,
                        help="K, the number of negative keys in the queue (default: 65536)")
    parser.add_argument("--momentum-encoder", type=float, default=0.999,
                        help="m, momentum of the key encoder's moving average (default: 0.999)")
    parser.add_argument("--temperature", type=float, default=0.2,
                        help="T, softmax temperature of the contrastive loss (default: 0.2)")
    parser.add_argument("--epochs", type=int, default=200,
                        help="total training epochs (default: 200)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global batch size over all processes (default: 256)")
    parser.add_argument("--lr", type=float, default=0.03,
                        help="initial SGD learning rate, decayed by a cosine per epoch "
                        "(default: 0.03)")
    parser.add_argument("--momentum", type=float, default=0.9,
                        help="SGD momentum (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="SGD weight decay (default: 0.0001)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="side of the random crops in pixels (default: 224)")
    parser.add_argument("--workers", type=int, default=4,
                        help="DataLoader worker processes per training process (default: 4)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None,
                        help="stop each epoch after this many steps, for short runs "
                        "(default: the whole bucket)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of initialisation, data order and augmentation (default: 0)")
    parser.add_argument("--bn-splits", type=int, default=8,
                        help="in a single process, compute batch norm over this many groups "
                        "of the batch so that queries and their keys fall in different "
                        "groups; ignored under torchrun with 2 or more processes (default: 8)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="training device; auto uses CUDA when available (default: auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast precision on CUDA; auto is bf16 on CUDA and fp32 on "
                        "CPU (default: auto)")
    parser.add_argument("--log-every", type=int, default=10,
                        help="log loss, contrastive accuracy, learning rate and images/s "
                        "every this many steps (default: 10)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files to models/moco/<run>/tensorboard/")
    parser.add_argument("--cache-dir", default=None,
                        help="local folder for shard tars read from S3 (default: a temporary "
                        "folder removed at the end)")


def run(config: Config) -> dict:
    from tasks.distributed import init_distributed, shutdown_distributed

    context = init_distributed(config.device)
    try:
        return train(config, context)
    finally:
        shutdown_distributed()


def train(config: Config, context) -> dict:
    """Train from the latest checkpoint of the run (or from scratch) up to `config.epochs`."""
    import torch

    from tasks.moco_data import bucket_manifest_key

    store = ArtifactStore(config.artifact_root)
    run_prefix = f"models/moco/{config.run}"
    if context.is_main:
        store.ensure_writable()

    # The bucket is checked before options.json is written, so a run started with an
    # unknown bucket does not pin it.
    manifest_key = bucket_manifest_key(store, config.split, config.bucket)
    check_run_options(store, run_prefix, config, context)
    checkpoint_key = latest_checkpoint_key(store, run_prefix)
    checkpoint = load_checkpoint(store, checkpoint_key) if checkpoint_key else None
    if checkpoint is not None:
        compare_options(checkpoint["options"], config.training_options(), checkpoint_key)
    start_epoch = checkpoint["epoch"] if checkpoint else 0
    if start_epoch >= config.epochs:
        logger.info("run %s already finished %d of %d epochs; nothing to train", config.run,
                    start_epoch, config.epochs)
        return build_summary(config, start_epoch, checkpoint_key, checkpoint["loss"])

    with tempfile.TemporaryDirectory(prefix="clear-moco-") as scratch:
        cache_dir = Path(config.cache_dir) if config.cache_dir else Path(scratch) / "shards"
        loader, sampler = build_training_data(store, config, context, manifest_key, cache_dir)

        torch.manual_seed(config.seed)
        model, optimizer, scaler = build_training_model(config, context)
        if checkpoint is not None:
            restore_training_state(model, optimizer, scaler, checkpoint)
            logger.info("resuming run %s from %s (%d of %d epochs done)", config.run,
                        checkpoint_key, start_epoch, config.epochs)
        del checkpoint

        tensorboard = TensorBoardLog(store, f"{run_prefix}/tensorboard", Path(scratch) / "tb") \
            if config.tensorboard and context.is_main else None
        loss = float("nan")
        for epoch in range(start_epoch, config.epochs):
            seed_epoch(config.seed, epoch, context.rank)
            sampler.set_epoch(epoch)
            learning_rate = set_learning_rate(optimizer, config, epoch)
            loss = train_one_epoch(model, loader, optimizer, scaler, config, context, epoch,
                                   learning_rate, tensorboard)
            checkpoint_key = save_checkpoint(store, run_prefix, model, optimizer, scaler,
                                             config, context, epoch, loss)
            if tensorboard is not None:
                tensorboard.publish()

        if tensorboard is not None:
            tensorboard.close()
        verify_replicas_in_sync(model, context)
    return build_summary(config, config.epochs, checkpoint_key, loss)


def build_summary(config: Config, epochs_done: int, checkpoint_key: str | None,
                  loss: float) -> dict:
    return {"run": config.run, "epochs_done": epochs_done, "last_checkpoint": checkpoint_key,
            "final_loss": loss}


def compare_options(saved: dict, current: dict, source: str) -> None:
    """Raise ConfigError naming every training option that differs from `saved`."""
    differences = [f"{name}: {saved.get(name)!r} there, {current[name]!r} now"
                   for name in current if saved.get(name) != current[name]]
    if differences:
        raise ConfigError(f"{source} was made with different training options "
                          f"({'; '.join(differences)}); pass the same options to resume, or a "
                          "new --run name to start another run")


def check_run_options(store: ArtifactStore, run_prefix: str, config: Config, context) -> None:
    """Record the run's training options, or fail when a checkpoint was made with others.

    A run without a checkpoint has trained nothing, so its options.json is replaced.
    """
    from tasks.distributed import barrier

    options_key = f"{run_prefix}/options.json"
    current = config.training_options()
    saved = store.read_json(options_key) if store.exists(options_key) else None
    if saved is not None and saved != current:
        if latest_checkpoint_key(store, run_prefix) is not None:
            compare_options(saved, current, store.url(options_key))
        logger.info("run %s has no checkpoint yet; replacing the options in %s", config.run,
                    store.url(options_key))
    # Every rank reads options.json before rank 0 rewrites it.
    barrier()
    if context.is_main and saved != current:
        store.write_json(options_key, current)


def latest_checkpoint_key(store: ArtifactStore, run_prefix: str) -> str | None:
    numbered = []
    for key in store.list(f"{run_prefix}/"):
        match = CHECKPOINT_PATTERN.search(key)
        if match and key.rsplit("/", 1)[-1] == match.group(0):
            numbered.append((int(match.group(1)), key))
    return max(numbered)[1] if numbered else None


def checkpoint_key_for(run_prefix: str, epoch: int) -> str:
    return f"{run_prefix}/checkpoint_{epoch:04d}.pth.tar"


def load_checkpoint(store: ArtifactStore, key: str) -> dict:
    import torch

    with store.local_copy(key) as path:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as error:
            raise StageError(f"cannot read checkpoint {store.url(key)} ({error}); delete it to "
                             "resume from the checkpoint before it") from error


def build_training_data(store: ArtifactStore, config: Config, context, manifest_key: str,
                        cache_dir: Path):
    from tasks.moco_data import BucketDataset, TwoViews, build_augmentation, build_loader

    if config.batch_size % context.world_size:
        raise StageError(f"--batch-size {config.batch_size} is not divisible by the "
                         f"{context.world_size} processes; pick a multiple of the process count")
    dataset = BucketDataset(store, manifest_key, TwoViews(build_augmentation(config.image_size)),
                            cache_dir)
    logger.info("training on %d samples of bucket %s (%s)", len(dataset), config.bucket,
                manifest_key)
    return build_loader(dataset, config.batch_size // context.world_size, config.workers,
                        context.rank, context.world_size, config.seed)


def resolve_precision(config: Config, device: str):
    """Return the autocast dtype for `device`, or None for fp32."""
    import torch

    on_cuda = device.startswith("cuda")
    if config.precision in ("bf16", "fp16") and not on_cuda:
        raise StageError(f"--precision {config.precision} needs a CUDA device; use "
                         "--precision fp32 or auto on CPU")
    if config.precision == "fp16":
        return torch.float16
    if config.precision == "bf16" or (config.precision == "auto" and on_cuda):
        return torch.bfloat16
    return None


def build_training_model(config: Config, context):
    """Build the MoCo model (wrapped in DDP when distributed), its SGD optimizer and grad scaler."""
    import torch

    from tasks.moco_model import MoCo

    bn_splits = 1 if context.is_distributed else config.bn_splits
    model = MoCo(config.arch, config.dim, config.queue_size, config.momentum_encoder,
                 config.temperature, bn_splits)
    model = model.to(context.device)
    if context.device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
        # Every step has the same input shapes, so cuDNN's algorithm search pays off
        # after the first steps, as in the MoCo reference.
        torch.backends.cudnn.benchmark = True
    if context.is_distributed:
        device_ids = [context.local_rank] if context.device.startswith("cuda") else None
        # NOTE: DDP broadcasts buffers (the queue and batch-norm statistics) from rank 0
        # before each forward, as in the MoCo reference. That keeps replicas identical but
        # sends the C x K queue every step.
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    dtype = resolve_precision(config, context.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return model, optimizer, scaler


def restore_training_state(model, optimizer, scaler, checkpoint: dict) -> None:
    from tasks.distributed import unwrap

    state_dict = {key.removeprefix("module."): value
                  for key, value in checkpoint["state_dict"].items()}
    unwrap(model).load_state_dict(state_dict)
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG from (seed, epoch, rank) so that any epoch can be replayed on resume."""
    import numpy as np
    import torch

    value = (seed * 1_000_003 + epoch) * 1_009 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def capture_rng_state(device: str) -> dict:
    """Return this process's Python, NumPy and torch RNG states as types weights_only loads.

    NumPy's key array becomes an int64 tensor, so `np.random.set_state((bit_generator,
    keys.numpy(), position, has_gauss, cached_gaussian))` restores it.
    """
    import numpy as np
    import torch

    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": bit_generator,
                  "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_learning_rate(optimizer, config: Config, epoch: int) -> float:
    """Apply the per-epoch cosine schedule of the MoCo reference and return the rate."""
    learning_rate = config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    return learning_rate


def train_one_epoch(model, loader, optimizer, scaler, config: Config, context, epoch: int,
                    learning_rate: float, tensorboard) -> float:
    """Train one epoch and return its mean loss over all steps and processes."""
    import torch
    import torch.nn.functional as F

    from tasks.distributed import all_reduce_mean

    model.train()
    dtype = resolve_precision(config, context.device)
    on_cuda = context.device.startswith("cuda")
    memory_format = torch.channels_last if on_cuda else torch.contiguous_format
    steps = len(loader) if config.max_steps_per_epoch is None else min(
        len(loader), config.max_steps_per_epoch)
    global_batch = config.batch_size
    total_loss = 0.0
    window_started = time.monotonic()
    window_steps = 0

    for step, (im_q, im_k) in enumerate(loader):
        if step >= steps:
            break
        im_q = im_q.to(context.device, non_blocking=True, memory_format=memory_format)
        im_k = im_k.to(context.device, non_blocking=True, memory_format=memory_format)

        with torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=dtype,
                            enabled=dtype is not None):
            logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits.float(), labels)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        loss_value = loss.item()
        total_loss += loss_value
        window_steps += 1
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            # Top-1 contrastive accuracy: how often the positive key (column 0) scores
            # above all K queue entries.
            accuracy = (logits.argmax(dim=1) == 0).float().mean().item()
            elapsed = max(time.monotonic() - window_started, 1e-9)
            images_per_second = window_steps * global_batch / elapsed
            logger.info("epoch %d/%d step %d/%d: loss %.4f, contrastive accuracy %.1f%%, "
                        "lr %.5f, %.1f images/s", epoch + 1, config.epochs, step + 1, steps,
                        loss_value, 100 * accuracy, learning_rate, images_per_second)
            if tensorboard is not None:
                global_step = epoch * steps + step + 1
                tensorboard.add_scalars(global_step, {
                    "train/loss": loss_value, "train/contrastive_accuracy": accuracy,
                    "train/lr": learning_rate, "train/images_per_second": images_per_second})
            window_started = time.monotonic()
            window_steps = 0

    return all_reduce_mean(total_loss / max(steps, 1), context.device)


def save_checkpoint(store: ArtifactStore, run_prefix: str, model, optimizer, scaler,
                    config: Config, context, epoch: int, loss: float) -> str:
    """Write `checkpoint_<epoch>.pth.tar` atomically from rank 0 and return its key."""
    import torch

    from tasks.distributed import unwrap

    key = checkpoint_key_for(run_prefix, epoch)
    if context.is_main:
        state = {
            "epoch": epoch + 1,
            "arch": config.arch,
            # The "module." prefix matches checkpoints of the MoCo reference, which saves
            # its DDP-wrapped model, so tools written for those load ours unchanged.
            "state_dict": {f"module.{name}": tensor.detach().cpu()
                           for name, tensor in unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng_state": capture_rng_state(context.device),
            "options": config.training_options(),
            "loss": loss,
        }
        with store.staged_file(key) as path:
            torch.save(state, path)
        logger.info("epoch %d/%d done: mean loss %.4f, checkpoint %s", epoch + 1,
                    config.epochs, loss, store.url(key))
    return key


def verify_replicas_in_sync(model, context) -> None:
    """Raise StageError unless all ranks contain identical parameters and queue.

    Batch-norm running statistics are left out: each rank updates them from its own
    batches, DDP overwrites them with rank 0's before every forward, and checkpoints
    store rank 0's.
    """
    import torch.distributed as dist

    from tasks.distributed import unwrap

    module = unwrap(model)
    tensors = dict(module.named_parameters())
    tensors.update(queue=module.queue, queue_ptr=module.queue_ptr)
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    checksum = digest.hexdigest()[:16]
    if not context.is_distributed:
        logger.info("final weights checksum %s", checksum)
        return
    checksums = [None] * context.world_size
    dist.all_gather_object(checksums, checksum)
    if len(set(checksums)) != 1:
        raise StageError(f"model replicas diverged: weight checksums per rank {checksums}")
    logger.info("final weights checksum %s, identical on all %d ranks", checksum,
                context.world_size)


class TensorBoardLog:
    """TensorBoard event files written locally and copied into the artifact root per epoch."""

    def __init__(self, store: ArtifactStore, prefix: str, local_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.store = store
        self.prefix = prefix
        self.local_dir = local_dir
        self.writer = SummaryWriter(log_dir=str(local_dir))

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def publish(self) -> None:
        self.writer.flush()
        for path in sorted(self.local_dir.rglob("*")):
            if path.is_file():
                self.store.put_file(path, f"{self.prefix}/{path.relative_to(self.local_dir)}")

    def close(self) -> None:
        self.publish()
        self.writer.close()
