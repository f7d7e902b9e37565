"""split: per-bucket train/test splits in the training_folder layout of Avalanche's CLEAR reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.cli import build_stage_parser
from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

from builders import write_labeled_dataset

CLASSES = ["bus", "cat", "dog"]


def run_stage(stage: str, artifact_root: str, *options: str) -> dict:
    args = build_stage_parser(stage).parse_args(["--artifact-root", artifact_root, *options])
    return args.module.run(args.module.Config.from_args(args))


def split(artifact_root: str, *options: str) -> dict:
    return run_stage("split", artifact_root, "--dataset", "tiny", *options)


def read_indices(root: str, seed: int, bucket: str, part: str) -> list[int]:
    path = (Path(root) / "datasets/tiny/training_folder/testset_ratio_0.3" / f"split_{seed}" /
            bucket / f"{part}_indices.json")
    return json.loads(path.read_text())


def read_flist(path: Path) -> list[tuple[str, int]]:
    """Read a file list as Avalanche's default_flist_reader does: `<path> <label>` per line."""
    pairs = []
    for line in path.read_text().splitlines():
        image_path, label = line.strip().rsplit(maxsplit=1)
        pairs.append((image_path, int(label)))
    return pairs


@pytest.fixture
def dataset_root(artifact_root) -> str:
    """A dataset `tiny` with buckets 0, 1 and 2, three classes of 10 images each."""
    write_labeled_dataset(ArtifactStore(artifact_root), "tiny", ["0", "1", "2"], CLASSES,
                          per_class=10, max_side=24)
    return artifact_root


def test_splits_disjoint_and_stratified(dataset_root):
    summary = split(dataset_root, "--seeds", "0,1")

    assert summary["seeds_written"] == [0, 1]
    training = Path(dataset_root) / "datasets/tiny/training_folder"
    assert json.loads((training / "bucket_indices.json").read_text()) == ["0", "1", "2"]
    for seed in (0, 1):
        for bucket in ("0", "1", "2"):
            all_samples = read_flist(training / "filelists" / bucket / "all.txt")
            train = read_indices(dataset_root, seed, bucket, "train")
            test = read_indices(dataset_root, seed, bucket, "test")
            assert not set(train) & set(test)
            assert sorted(train + test) == list(range(len(all_samples)))
            test_labels = [all_samples[i][1] for i in test]
            assert [test_labels.count(label) for label in range(3)] == [3, 3, 3]
            split_dir = training / "testset_ratio_0.3" / f"split_{seed}" / bucket
            assert read_flist(split_dir / "test.txt") == [all_samples[i] for i in test]
            assert read_flist(split_dir / "train.txt") == [all_samples[i] for i in train]


def test_split_reproducible_per_seed(tmp_path):
    roots = []
    for name in ("first", "second"):
        root = tmp_path / name
        write_labeled_dataset(ArtifactStore(str(root)), "tiny", ["0", "1"], CLASSES,
                              per_class=10, max_side=24)
        split(str(root), "--seeds", "3,4")
        roots.append(str(root))

    for bucket in ("0", "1"):
        assert read_indices(roots[0], 3, bucket, "test") == read_indices(roots[1], 3, bucket,
                                                                         "test")
    assert read_indices(roots[0], 3, "0", "test") != read_indices(roots[0], 4, "0", "test")


def test_image_paths_resolve_from_dataset_root(dataset_root):
    split(dataset_root, "--seeds", "0")

    dataset = Path(dataset_root) / "datasets/tiny"
    for image_path, _ in read_flist(dataset / "training_folder/testset_ratio_0.3/split_0/1/"
                                    "train.txt"):
        assert (dataset / image_path).is_file(), image_path


def test_rerun_skips_finished_seeds(dataset_root):
    split(dataset_root, "--seeds", "0")
    marker = (Path(dataset_root) /
              "datasets/tiny/training_folder/testset_ratio_0.3/split_0/split.json")
    before = marker.stat().st_mtime_ns

    summary = split(dataset_root, "--seeds", "0,1")

    assert summary["seeds_skipped"] == [0]
    assert summary["seeds_written"] == [1]
    assert marker.stat().st_mtime_ns == before


def test_changed_filelists_fail(dataset_root):
    split(dataset_root, "--seeds", "0")
    filelist = Path(dataset_root) / "datasets/tiny/filelists/0.txt"
    filelist.write_text("".join(filelist.read_text().splitlines(keepends=True)[1:]))

    with pytest.raises(StageError, match="written from different file lists"):
        split(dataset_root, "--seeds", "0")


def test_feature_tables_follow_all_txt(dataset_root):
    run_stage("extract-features", dataset_root, "--dataset", "tiny", "--random-init",
              "--arch", "resnet18", "--name", "random", "--image-size", "32", "--workers", "0",
              "--device", "cpu")

    summary = split(dataset_root, "--seeds", "0")

    assert summary["feature_sets"] == ["random"]
    dataset = Path(dataset_root) / "datasets/tiny"
    table, targets = torch.load(dataset / "training_folder/features/random/2/all.pth",
                                weights_only=True)
    all_samples = read_flist(dataset / "training_folder/filelists/2/all.txt")
    assert table.shape == (30, 512)
    assert targets == [label for _, label in all_samples]
    image_path, label = all_samples[17]
    per_class = torch.load(dataset / f"features/random/2/{CLASSES[label]}.pth",
                           weights_only=True)
    assert torch.equal(table[17], per_class[Path(image_path).stem])


@pytest.mark.parametrize(("options", "message"), [
    (["--test-ratio", "1.5"], "--test-ratio must be between 0 and 1"),
    (["--test-ratio", "0"], "--test-ratio must be between 0 and 1"),
    (["--seeds", "0,x"], "--seeds '0,x' is invalid"),
    (["--seeds", "1,1"], "must list distinct non-negative integers"),
    (["--dataset", "../up"], "not a valid dataset name"),
])
def test_invalid_options_rejected(artifact_root, options, message):
    with pytest.raises(ConfigError, match=message):
        split(artifact_root, *options)


def test_unfinished_dataset_rejected(dataset_root):
    ArtifactStore(dataset_root).delete("datasets/tiny/labeled_metadata.json")

    with pytest.raises(StageError, match="dataset tiny is not finished.*run curate"):
        split(dataset_root, "--seeds", "0")
    assert not (Path(dataset_root) / "datasets/tiny/training_folder").exists()


def test_buckets_come_from_dataset_index(dataset_root):
    store = ArtifactStore(dataset_root)
    # A curate run that was killed after finishing bucket 2 did not add it to the index.
    index = store.read_json("datasets/tiny/labeled_metadata.json")
    store.write_json("datasets/tiny/labeled_metadata.json",
                     {bucket: index[bucket] for bucket in ("0", "1")})

    summary = split(dataset_root, "--seeds", "0")

    assert summary["buckets"] == 2
    training = Path(dataset_root) / "datasets/tiny/training_folder"
    assert json.loads((training / "bucket_indices.json").read_text()) == ["0", "1"]
    assert not (training / "testset_ratio_0.3/split_0/2").exists()


def test_missing_dataset_fails(artifact_root):
    with pytest.raises(StageError, match="class_names.txt"):
        split(artifact_root)
