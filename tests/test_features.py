"""extract-features: backbones from MoCo checkpoints applied to a small curated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.cli import build_stage_parser
from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

from builders import make_jpeg, write_bucket, write_labeled_dataset, write_shard

CLASSES = ["bus", "cat"]


def run_stage(stage: str, artifact_root: str, *options: str) -> dict:
    args = build_stage_parser(stage).parse_args(["--artifact-root", artifact_root, *options])
    return args.module.run(args.module.Config.from_args(args))


def extract(artifact_root: str, *options: str) -> dict:
    return run_stage("extract-features", artifact_root, "--dataset", "tiny", "--image-size", "32",
                     "--batch-size", "4", "--workers", "0", "--device", "cpu", *options)


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory) -> str:
    """An artifact root with a one-step MoCo run `b0` and a dataset `tiny` of 2 x 2 x 3 images."""
    root = str(tmp_path_factory.mktemp("features") / "artifacts")
    store = ArtifactStore(root)
    samples = {photo_id: make_jpeg(photo_id, max_side=48) for photo_id in range(100, 108)}
    write_shard(store, "00000", samples)
    write_bucket(store, "default", "0", "00000", list(samples))
    run_stage("train-moco", root, "--run", "b0", "--arch", "resnet18", "--image-size", "32",
              "--batch-size", "8", "--queue-size", "16", "--epochs", "1", "--workers", "0",
              "--device", "cpu")
    write_labeled_dataset(store, "tiny", ["0", "1"], CLASSES, per_class=3)
    return root


def test_features_match_checkpoint_backbone(trained_root):
    from tasks.features import LabeledImages
    from tasks.moco_model import backbone_state_dict, build_backbone

    summary = extract(trained_root, "--moco-run", "b0", "--name", "moco_b0")

    assert summary["samples"] == 12
    assert summary["feature_dim"] == 512
    dataset = Path(trained_root) / "datasets/tiny"
    index = json.loads((dataset / "features/moco_b0/features.json").read_text())
    assert list(index) == ["0", "1"]
    assert index["1"]["cat"] == "features/moco_b0/1/cat.pth"
    features = torch.load(dataset / index["1"]["cat"], weights_only=True)
    assert list(features) == ["1009", "1010", "1011"]

    checkpoint = torch.load(Path(trained_root) / "models/moco/b0/checkpoint_0000.pth.tar",
                            weights_only=True)
    backbone = build_backbone("resnet18")
    backbone.load_state_dict(backbone_state_dict(checkpoint["state_dict"]))
    backbone.eval()
    images = LabeledImages(ArtifactStore(trained_root), "datasets/tiny",
                           ["labeled_images/1/cat/1010.jpg"], 32)
    with torch.no_grad():
        expected = backbone(images[0].unsqueeze(0))[0]
    # Batched and single-image convolutions round differently; a wrong backbone would
    # differ by far more than 0.1%.
    assert torch.allclose(features["1010"], expected, rtol=1e-3)


def test_rerun_skips_finished_buckets(trained_root):
    extract(trained_root, "--moco-run", "b0", "--name", "again")
    written = Path(trained_root) / "datasets/tiny/features/again/0/bus.pth"
    before = written.stat().st_mtime_ns

    summary = extract(trained_root, "--moco-run", "b0", "--name", "again")

    assert summary["buckets_skipped"] == 2
    assert written.stat().st_mtime_ns == before


def test_other_backbone_under_same_name_fails(trained_root):
    extract(trained_root, "--moco-run", "b0", "--name", "taken")

    with pytest.raises(ConfigError, match="different source"):
        extract(trained_root, "--random-init", "--arch", "resnet18", "--name", "taken")


def test_checkpoint_option_reads_artifact_key(trained_root):
    summary = extract(trained_root, "--checkpoint", "models/moco/b0/checkpoint_0000.pth.tar",
                      "--name", "by_key")

    assert summary["arch"] == "resnet18"
    record = json.loads((Path(trained_root) /
                         "datasets/tiny/features/by_key/extraction.json").read_text())
    assert record["source"]["epoch"] == 1
    assert len(record["source"]["sha256"]) == 64


def test_arch_conflicting_with_checkpoint_fails(trained_root):
    with pytest.raises(ConfigError, match="differs from the checkpoint's arch resnet18"):
        extract(trained_root, "--moco-run", "b0", "--arch", "resnet50", "--name", "wrong")


def test_missing_moco_run_fails(trained_root):
    with pytest.raises(StageError, match="no checkpoint found"):
        extract(trained_root, "--moco-run", "absent", "--name", "none")


def test_moco_run_name_validated(artifact_root):
    with pytest.raises(ConfigError, match="--moco-run '../x' is not a valid run name"):
        extract(artifact_root, "--moco-run", "../x")


def test_folder_checkpoint_fails_cleanly(trained_root, tmp_path):
    with pytest.raises(StageError, match="is a folder"):
        extract(trained_root, "--checkpoint", str(tmp_path), "--name", "folder")


@pytest.mark.parametrize("content", [b"", b"\x80\x02not a pickle" * 40, b"PK\x03\x04broken zip"])
def test_garbage_checkpoint_one_line_error(trained_root, tmp_path, content):
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(content)

    with pytest.raises(StageError, match="cannot load checkpoint") as error:
        extract(trained_root, "--checkpoint", str(garbage), "--name", "garbage")

    assert str(garbage) in str(error.value)
    assert "\n" not in str(error.value)


def test_unfinished_dataset_rejected(artifact_root):
    store = ArtifactStore(artifact_root)
    write_labeled_dataset(store, "tiny", ["0", "1"], CLASSES, per_class=1, max_side=24)
    store.delete("datasets/tiny/labeled_metadata.json")

    with pytest.raises(StageError, match="dataset tiny is not finished.*run curate"):
        extract(artifact_root, "--random-init", "--arch", "resnet18", "--name", "random")


def test_buckets_come_from_dataset_index(artifact_root):
    store = ArtifactStore(artifact_root)
    write_labeled_dataset(store, "tiny", ["0", "1"], CLASSES, per_class=1, max_side=24)
    # A curate run that was killed after finishing bucket 1 did not add it to the index.
    index = store.read_json("datasets/tiny/labeled_metadata.json")
    store.write_json("datasets/tiny/labeled_metadata.json", {"0": index["0"]})

    summary = extract(artifact_root, "--random-init", "--arch", "resnet18", "--name", "random")

    assert summary["buckets"] == 1
    features = json.loads((Path(artifact_root) /
                           "datasets/tiny/features/random/features.json").read_text())
    assert list(features) == ["0"]


def test_backbone_source_required(artifact_root):
    with pytest.raises(ConfigError, match="exactly one backbone source"):
        extract(artifact_root)


@pytest.mark.parametrize("prefix", ["module.encoder_q.", "encoder_q.", ""])
def test_backbone_state_dict_strips_prefixes(prefix):
    from tasks.moco_model import backbone_state_dict

    state = {f"{prefix}conv1.weight": torch.ones(1), f"{prefix}fc.0.weight": torch.ones(1)}
    if prefix:
        state[prefix.replace("encoder_q", "encoder_k") + "conv1.weight"] = torch.zeros(1)
        state[prefix.replace("encoder_q.", "queue")] = torch.zeros(1)

    assert list(backbone_state_dict(state)) == ["conv1.weight"]
