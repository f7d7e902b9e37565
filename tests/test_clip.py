"""extract-clip on small real shards with the tiny open_clip model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tasks import clip
from tasks.cli import main
from tasks.errors import StageError
from tasks.storage import ArtifactStore

from builders import make_jpeg, tiny_clip_checkpoint, write_bucket, write_shard

PHOTO_IDS = list(range(1000, 1011))
CORRUPT_ID = 1004
FEATURES = "features/default/clear-tiny/0"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return tiny_clip_checkpoint(tmp_path_factory.getbasetemp() / "models")


@pytest.fixture
def bucket_store(artifact_root) -> ArtifactStore:
    """One shard of 11 small photos, one of them a truncated JPEG, in bucket 0."""
    store = ArtifactStore(artifact_root)
    samples = {photo_id: make_jpeg(photo_id, max_side=32) for photo_id in PHOTO_IDS}
    # Cut the JPEG after its header: Pillow can open it but not decode it.
    samples[CORRUPT_ID] = samples[CORRUPT_ID][: len(samples[CORRUPT_ID]) * 7 // 10]
    write_shard(store, "00000", samples)
    write_bucket(store, "default", "0", "00000", PHOTO_IDS)
    return store


def make_config(store: ArtifactStore, checkpoint, **overrides) -> clip.Config:
    options = {"artifact_root": store.root, "split": "default", "bucket": "0",
               "model": "clear-tiny", "checkpoint": str(checkpoint), "batch_size": 2,
               "workers": 0, "device": "cpu", "chunk_size": 4, "precision": "fp32"}
    return clip.Config(**{**options, **overrides})


def load_all_chunks(store: ArtifactStore) -> dict[str, np.ndarray]:
    manifest = store.read_json(f"{FEATURES}/manifest.json")
    chunks = [clip.read_chunk(store, chunk["key"]) for chunk in manifest["chunks"]]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def test_cli_writes_chunks_and_manifest(bucket_store, tiny_checkpoint, capsys):
    code = main(["extract-clip", "--artifact-root", bucket_store.root, "--split", "default",
                 "--bucket", "0", "--model", "clear-tiny", "--checkpoint", str(tiny_checkpoint),
                 "--batch-size", "3", "--workers", "1", "--device", "cpu",
                 "--chunk-size", "4"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 10
    assert summary["failed_samples"] == 1
    assert summary["chunks_total"] == 3

    manifest = bucket_store.read_json(f"{FEATURES}/manifest.json")
    assert [c["key"] for c in manifest["chunks"]] == [
        f"{FEATURES}/chunk-{i:05d}.npz" for i in range(3)]
    assert [c["samples"] + c["failed"] for c in manifest["chunks"]] == [4, 4, 3]
    assert manifest["embed_dim"] == 64
    assert manifest["checkpoint_sha256"]
    assert manifest["failed"][0]["photo_id"] == CORRUPT_ID

    arrays = load_all_chunks(bucket_store)
    assert arrays["photo_id"].tolist() == [p for p in PHOTO_IDS if p != CORRUPT_ID]
    assert arrays["embedding"].dtype == np.float32
    assert arrays["embedding"].shape == (10, 64)
    norms = np.linalg.norm(arrays["embedding_normalized"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_corrupt_image_recorded_not_fatal(bucket_store, tiny_checkpoint):
    summary = clip.run(make_config(bucket_store, tiny_checkpoint))
    assert summary["complete"] is True
    arrays = load_all_chunks(bucket_store)
    assert arrays["failed_photo_id"].tolist() == [CORRUPT_ID]
    assert "truncated" in str(arrays["failed_error"][0]).lower()
    assert CORRUPT_ID not in arrays["photo_id"].tolist()


def test_resume_skips_finished_chunks(bucket_store, tiny_checkpoint, artifact_root, tmp_path):
    first = clip.run(make_config(bucket_store, tiny_checkpoint, max_chunks=1))
    assert first["complete"] is False
    assert first["chunks_written"] == 1
    assert not bucket_store.exists(f"{FEATURES}/manifest.json")
    chunk_path = bucket_store.path / FEATURES / "chunk-00000.npz"
    written_at = chunk_path.stat().st_mtime_ns

    second = clip.run(make_config(bucket_store, tiny_checkpoint))
    assert second["complete"] is True
    assert second["chunks_written"] == 2
    assert chunk_path.stat().st_mtime_ns == written_at

    fresh_root = tmp_path / "fresh"
    fresh = ArtifactStore(str(fresh_root))
    for key in bucket_store.list("images") + bucket_store.list("buckets"):
        fresh.write_bytes(key, bucket_store.read_bytes(key))
    clip.run(make_config(fresh, tiny_checkpoint))
    resumed, uninterrupted = load_all_chunks(bucket_store), load_all_chunks(fresh)
    for name in ("photo_id", "embedding", "embedding_normalized", "failed_photo_id"):
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])

    third = clip.run(make_config(bucket_store, tiny_checkpoint))
    assert third["chunks_written"] == 0


def test_rerun_with_other_options_fails(bucket_store, tiny_checkpoint):
    clip.run(make_config(bucket_store, tiny_checkpoint, max_chunks=1))
    with pytest.raises(StageError, match="chunk_size"):
        clip.run(make_config(bucket_store, tiny_checkpoint, chunk_size=5))


def test_missing_bucket_lists_known(bucket_store, tiny_checkpoint):
    with pytest.raises(StageError, match="valid buckets: 0"):
        clip.run(make_config(bucket_store, tiny_checkpoint, bucket="7"))


def test_batches_never_span_chunks():
    batches = clip.plan_batches([0, 2], total=11, chunk_size=4, batch_size=3)
    assert batches == [(0, [0, 1, 2]), (0, [3]), (2, [8, 9, 10])]


def test_jpeg_draft_keeps_input_size():
    from PIL import Image

    data = make_jpeg(1000, max_side=500)
    full = clip.decode_for_model(data, draft_size=None)
    drafted = clip.decode_for_model(data, draft_size=32)
    assert full.size == Image.open(io.BytesIO(data)).size
    assert min(drafted.size) >= 32
    assert drafted.size[0] < full.size[0]
    assert drafted.mode == "RGB"

    # EXIF orientation 6 (rotated 90 degrees) swaps width and height after the draft.
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(data)).save(buffer, format="JPEG", exif=exif)
    rotated = clip.decode_for_model(buffer.getvalue(), draft_size=32)
    assert rotated.size == drafted.size[::-1]


def test_jpeg_draft_recorded_in_options(bucket_store, tiny_checkpoint):
    clip.run(make_config(bucket_store, tiny_checkpoint, max_chunks=1))
    assert bucket_store.read_json(f"{FEATURES}/options.json")["jpeg_draft"] is True
    with pytest.raises(StageError, match="jpeg_draft"):
        clip.run(make_config(bucket_store, tiny_checkpoint, jpeg_draft=False))


def test_no_jpeg_draft_flag(bucket_store, tiny_checkpoint):
    code = main(["extract-clip", "--artifact-root", bucket_store.root, "--bucket", "0",
                 "--model", "clear-tiny", "--checkpoint", str(tiny_checkpoint),
                 "--workers", "0", "--device", "cpu", "--no-jpeg-draft"])
    assert code == 0
    assert bucket_store.read_json(f"{FEATURES}/options.json")["jpeg_draft"] is False
