"""train-moco: the MoCo model, resumption, two-process training and option checks, on CPU."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.cli import build_stage_parser
from tasks.errors import ConfigError
from tasks.storage import ArtifactStore

from builders import make_jpeg, write_bucket, write_shard

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
             "--queue-size", "20", "--workers", "0", "--log-every", "1", "--bn-splits", "2"]


def parse_config(artifact_root: str, *options: str):
    from tasks import moco

    args = build_stage_parser("train-moco").parse_args(["--artifact-root", artifact_root,
                                                        *options])
    return moco.Config.from_args(args)


def train(artifact_root: str, *options: str) -> dict:
    from tasks import moco

    return moco.run(parse_config(artifact_root, *options))


@pytest.fixture
def bucket_root(artifact_root) -> str:
    """An artifact root with one shard of 16 photographs and bucket 0 of split `default`."""
    store = ArtifactStore(artifact_root)
    samples = {photo_id: make_jpeg(photo_id, max_side=48) for photo_id in range(100, 116)}
    write_shard(store, "00000", samples)
    write_bucket(store, "default", "0", "00000", list(samples))
    return artifact_root


def test_loss_falls_on_fixed_batch():
    from tasks.moco_model import MoCo

    torch.manual_seed(0)
    model = MoCo("resnet18", dim=16, queue_size=512, momentum=0.9, temperature=0.2, bn_splits=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                momentum=0.9)
    im_q = torch.randn(8, 3, 32, 32)
    im_k = im_q + 0.05 * torch.randn_like(im_q)
    # Enqueued keys of the same batch would become near-copies of the positives. A fixed
    # queue of random negatives keeps the task the same at every step.
    negatives = model.queue.clone()

    losses = []
    for _ in range(8):
        model.queue.copy_(negatives)
        logits, labels = model(im_q, im_k)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_enqueue_wraps_around_queue_end():
    from tasks.moco_model import MoCo

    model = MoCo("resnet18", dim=4, queue_size=10)
    batches = [torch.full((4, 4), float(index)) for index in (1, 2, 3)]
    for keys in batches:
        model._dequeue_and_enqueue(keys)

    # 12 keys into 10 slots: batch 3 fills slots 8, 9, 0 and 1.
    assert int(model.queue_ptr) == 2
    assert model.queue[0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]


def test_single_process_shuffle_restores_key_order():
    from tasks.moco_model import MoCo

    model = MoCo("resnet18", dim=4, queue_size=16)
    images = torch.arange(6, dtype=torch.float32).view(6, 1)
    shuffled, inverse = model._batch_shuffle(images)
    assert model._batch_unshuffle(shuffled, inverse).flatten().tolist() == list(range(6))


def test_checkpoint_has_reference_keys(bucket_root):
    summary = train(bucket_root, "--run", "keys", "--epochs", "1", "--max-steps-per-epoch", "1",
                    *SMALL_RUN)

    assert summary["epochs_done"] == 1
    assert summary["last_checkpoint"] == "models/moco/keys/checkpoint_0000.pth.tar"
    path = Path(bucket_root) / summary["last_checkpoint"]
    checkpoint = torch.load(path, weights_only=True)
    for key in ("epoch", "arch", "state_dict", "optimizer", "scaler", "rng_state", "options"):
        assert key in checkpoint
    assert checkpoint["epoch"] == 1
    assert checkpoint["arch"] == "resnet18"
    assert "module.encoder_q.fc.2.weight" in checkpoint["state_dict"]
    assert "module.queue" in checkpoint["state_dict"]


def test_rng_state_restores_after_weights_only_load(tmp_path):
    import random

    import numpy as np

    from tasks.moco import capture_rng_state, seed_epoch

    seed_epoch(3, 1, 0)
    torch.save({"rng_state": capture_rng_state("cpu")}, tmp_path / "state.pth")
    expected = (random.random(), np.random.random(), torch.rand(1).item())

    state = torch.load(tmp_path / "state.pth", weights_only=True)["rng_state"]
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy(),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])

    assert random.random() == expected[0]
    assert np.random.random() == expected[1]
    assert torch.rand(1).item() == expected[2]


def test_resumed_run_repeats_next_step(bucket_root):
    options = ["--epochs", "2", "--max-steps-per-epoch", "1", *SMALL_RUN]
    whole = train(bucket_root, "--run", "whole", *options)

    # A run that stopped after its first checkpoint: only epoch 0's outputs exist.
    whole_dir = Path(bucket_root) / "models/moco/whole"
    resumed_dir = Path(bucket_root) / "models/moco/resumed"
    resumed_dir.mkdir(parents=True)
    shutil.copy(whole_dir / "options.json", resumed_dir / "options.json")
    shutil.copy(whole_dir / "checkpoint_0000.pth.tar", resumed_dir / "checkpoint_0000.pth.tar")
    resumed = train(bucket_root, "--run", "resumed", *options)

    assert resumed["final_loss"] == whole["final_loss"]
    expected = torch.load(whole_dir / "checkpoint_0001.pth.tar", weights_only=True)
    actual = torch.load(resumed_dir / "checkpoint_0001.pth.tar", weights_only=True)
    assert actual["epoch"] == 2
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name


def test_finished_run_is_not_retrained(bucket_root):
    options = ["--run", "done", "--epochs", "1", "--max-steps-per-epoch", "1", *SMALL_RUN]
    first = train(bucket_root, *options)
    checkpoint = Path(bucket_root) / first["last_checkpoint"]
    written = checkpoint.stat().st_mtime_ns

    second = train(bucket_root, *options)

    assert second == first
    assert checkpoint.stat().st_mtime_ns == written


def test_restart_with_other_options_fails(bucket_root):
    train(bucket_root, "--run", "fixed", "--epochs", "1", "--max-steps-per-epoch", "1",
          *SMALL_RUN)

    with pytest.raises(ConfigError, match="temperature: 0.2 there, 0.1 now"):
        train(bucket_root, "--run", "fixed", "--epochs", "1", "--max-steps-per-epoch", "1",
              "--temperature", "0.1", *SMALL_RUN)


@pytest.mark.parametrize(("options", "message"), [
    (["--arch", "vgg16"], "--arch 'vgg16' is not supported"),
    (["--queue-size", "100", "--batch-size", "256"], "must be at least --batch-size"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--momentum-encoder", "1.0"], r"--momentum-encoder must be in \[0, 1\)"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--run", "../escape"], "not a valid run name"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--momentum", "inf"], "--momentum must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--momentum-encoder", "nan"], "--momentum-encoder must be a finite number, got nan"),
])
def test_invalid_options_rejected(artifact_root, options, message):
    arguments = ["--run", "r", *options] if "--run" not in options else options
    with pytest.raises(ConfigError, match=message):
        parse_config(artifact_root, *arguments)


def test_unknown_bucket_rejected(bucket_root):
    from tasks.errors import StageError

    with pytest.raises(StageError, match="bucket '7' not found.*valid buckets: 0"):
        train(bucket_root, "--run", "nobucket", "--bucket", "7", "--epochs", "1", *SMALL_RUN)


def test_unknown_bucket_does_not_pin_options(bucket_root):
    from tasks.errors import StageError

    options = ["--run", "retry", "--epochs", "1", "--max-steps-per-epoch", "1", *SMALL_RUN]
    with pytest.raises(StageError, match="bucket '9' not found"):
        train(bucket_root, *options, "--bucket", "9")
    assert not (Path(bucket_root) / "models/moco/retry/options.json").exists()

    summary = train(bucket_root, *options, "--bucket", "0")

    assert summary["epochs_done"] == 1


def test_options_replaced_before_first_checkpoint(bucket_root):
    import json

    run_dir = Path(bucket_root) / "models/moco/unstarted"
    run_dir.mkdir(parents=True)
    (run_dir / "options.json").write_text(json.dumps({"bucket": "9", "temperature": 0.5}))

    train(bucket_root, "--run", "unstarted", "--epochs", "1", "--max-steps-per-epoch", "1",
          *SMALL_RUN)

    saved = json.loads((run_dir / "options.json").read_text())
    assert saved["bucket"] == "0"
    assert saved["temperature"] == 0.2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_torchrun_keeps_replicas_identical(bucket_root):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "tasks", "--", "train-moco", "--artifact-root", bucket_root, "--run", "ddp",
               "--epochs", "2", "--max-steps-per-epoch", "2", *SMALL_RUN]
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                               os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=240)

    assert result.returncode == 0, result.stderr[-4000:]
    checksums = dict(re.findall(r"rank(\d)\] tasks\.moco: final weights checksum (\w+), "
                                r"identical on all 2 ranks", result.stderr))
    assert set(checksums) == {"0", "1"}, result.stderr[-4000:]
    assert checksums["0"] == checksums["1"]
    checkpoint = Path(bucket_root) / "models/moco/ddp/checkpoint_0001.pth.tar"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
