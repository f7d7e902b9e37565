"""curate: CLEAR's selection rules on planted embeddings, and the dataset layout end to end."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from tasks import clip, curate
from tasks.curate_config import parse_concept_config
from tasks.curate_retrieval import (
    CandidateCollector,
    exact_scores,
    select_background,
    select_positives,
)
from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

from builders import make_jpeg, tiny_clip_checkpoint, write_bucket, write_shard

# Two concepts, A = x axis and B = y axis, and eight planted images (rows).
# Scores (A, B): r0 (1, 0), r1 (.8, .6), r2 (.6, .8), r3 (0, 1), r4 (.8, .6) a copy of r1,
# r5 (0, 0), r6 (-.6, -.8), r7 (-1, 0).
TEXT = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
IMAGES = np.array([[1, 0, 0], [.8, .6, 0], [.6, .8, 0], [0, 1, 0], [.8, .6, 0], [0, 0, 1],
                   [-.6, -.8, 0], [-1, 0, 0]])
NAMES = ["A", "B"]


def collect(top_size, bottom_size=0, chunk=3) -> CandidateCollector:
    collector = CandidateCollector(TEXT, top_size, bottom_size)
    for start in range(0, len(IMAGES), chunk):
        rows = np.arange(start, min(start + chunk, len(IMAGES)))
        collector.add(rows, IMAGES[rows])
    return collector


def rows_of(picks) -> list[int]:
    return [pick.row for pick in picks]


def test_without_overlap_best_concept_wins():
    collector = collect(top_size=4)
    selected = select_positives(collector.top, 2, False, NAMES, "0")
    # r1 and r4 tie on A; the earlier row wins. r2 scores higher on B than on A.
    assert rows_of(selected[0]) == [0, 1]
    assert rows_of(selected[1]) == [3, 2]
    assert [p.score for p in selected[0]] == pytest.approx([1.0, 0.8])


def test_with_overlap_concepts_share_images():
    collector = collect(top_size=3)
    selected = select_positives(collector.top, 3, True, NAMES, "0")
    assert rows_of(selected[0]) == [0, 1, 4]
    assert rows_of(selected[1]) == [3, 2, 1]


def test_too_few_candidates_names_bucket_and_class():
    collector = collect(top_size=4)
    with pytest.raises(StageError, match=r"bucket 7: class 'B' has 2 images, 3 needed"):
        select_positives(collector.top, 3, False, NAMES, "7")


def test_class_larger_than_bucket_names_bucket_size():
    collector = collect(top_size=10)
    with pytest.raises(StageError) as error:
        select_positives(collector.top, 9, True, NAMES, "7", bucket_size=len(IMAGES))
    message = str(error.value)
    assert "the bucket has only 8 embedded images" in message
    assert "lower NUM_OF_IMAGES_PER_CLASS_PER_BUCKET" in message
    assert "--allow-small-classes" in message
    assert "_TO_QUERY" not in message


def test_whole_bucket_queried_hint_omits_query_size():
    collector = collect(top_size=10)
    with pytest.raises(StageError) as error:
        select_positives(collector.top, 5, False, NAMES, "7", bucket_size=len(IMAGES))
    assert "the bucket has only 8 embedded images" in str(error.value)
    assert "_TO_QUERY" not in str(error.value)


def test_allow_small_classes_warns(caplog):
    collector = collect(top_size=4)
    with caplog.at_level(logging.WARNING):
        selected = select_positives(collector.top, 3, False, NAMES, "7", allow_small=True)
    assert rows_of(selected[0]) == [0, 1, 4]
    assert rows_of(selected[1]) == [3, 2]
    assert "class 'B' has 2 images" in caplog.text


def test_concept_tie_goes_to_first_concept():
    collector = CandidateCollector(TEXT, 1, 0)
    collector.add(np.array([0]), np.array([[0.5, 0.5, 0.0]]))
    selected = select_positives(collector.top, 1, False, NAMES, "0", allow_small=True)
    assert rows_of(selected[0]) == [0]
    assert rows_of(selected[1]) == []


def test_background_takes_lowest_unique_images():
    collector = collect(top_size=4, bottom_size=4)
    positives = select_positives(collector.top, 2, False, NAMES, "0")
    background = select_background(collector.bottom, positives, 2, 1, NAMES, "0")
    # A is farthest from r7 (-1), B from r6 (-.8).
    assert rows_of(background) == [7, 6]
    assert [p.concept for p in background] == [0, 1]


def test_background_excludes_positives():
    collector = collect(top_size=4, bottom_size=4)
    positives = select_positives(collector.top, 2, False, NAMES, "0")
    # A's two lowest are r7 and r3, B's are r6 and r0; r3 and r0 are positives.
    with pytest.raises(StageError, match="BACKGROUND"):
        select_background(collector.bottom, positives, 2, 2, NAMES, "0")
    background = select_background(collector.bottom, positives, 2, 2, NAMES, "0",
                                   allow_small=True)
    assert rows_of(background) == [7, 6]
    assert len(set(rows_of(background))) == len(background)


def test_chunking_does_not_change_candidates():
    whole, chunked = collect(4, 4, chunk=len(IMAGES)), collect(4, 4, chunk=1)
    for a, b in zip(whole.top + whole.bottom, chunked.top + chunked.bottom, strict=True):
        assert a.rows.tolist() == b.rows.tolist()


@pytest.mark.parametrize("chunk", [1, 97, 4096])
def test_float32_prefilter_matches_float64(chunk):
    rng = np.random.default_rng(5)
    images = rng.standard_normal((3000, 64)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    # Exact duplicates tie on every concept; rows nudged by one float32 ulp nearly tie.
    images[1000:1100] = images[0:100]
    images[1100:1200] = np.nextafter(images[0:100], np.float32(2))
    text = rng.standard_normal((4, 64))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    collector = CandidateCollector(text, 150, 120)
    for start in range(0, len(images), chunk):
        rows = np.arange(start, min(start + chunk, len(images)))
        collector.add(rows, images[rows])

    scores = np.stack([exact_scores(images, t) for t in text], axis=1)
    rows = np.arange(len(images))
    for concept in range(len(text)):
        best = np.lexsort((rows, -scores[:, concept]))[:150]
        worst = np.lexsort((rows, scores[:, concept]))[:120]
        assert collector.top[concept].rows.tolist() == best.tolist()
        assert collector.bottom[concept].rows.tolist() == worst.tolist()
        assert collector.top[concept].scores == pytest.approx(scores[best, concept], abs=1e-12)


CONFIG = {"NAME": "tiny-test", "PREFIX": "a photo of ", "ALLOW_OVERLAP": 1,
          "CLIP_MODEL": "ViT-B/32", "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET": 2,
          "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY": 3, "BACKGROUND": 1,
          "NEGATIVE_RATIO": 0.5, "GROUP": {"vehicles": ["red bus"], "things": ["camera"]},
          "LABEL_MAP": {"red bus": "bus"}, "SAVE_PATH": "/ignored"}


@pytest.mark.parametrize(("change", "message"), [
    ({"NUM_OF_IMAGES_PER_CLASS_PER_BUCKET": 0}, "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET"),
    ({"NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY": 1}, "at least"),
    ({"NEGATIVE_RATIO": 1.5}, "NEGATIVE_RATIO"),
    ({"NEGATIVE_RATIO": 0.1}, "rounds down to 0"),
    ({"ALLOW_OVERLAP": 2}, "ALLOW_OVERLAP"),
    ({"GROUP": {"g": ["bus", "bus"]}, "LABEL_MAP": {}}, "twice"),
    ({"LABEL_MAP": {"tram": "t"}}, "not in GROUP"),
    ({"NAME": "../escape"}, "NAME"),
    ({"PROMPT_TEMPLATES": ["no placeholder"]}, "PROMPT_TEMPLATES"),
    ({"BACKGROUND": 0, "NEGATIVE_RATIO": "x"}, "NEGATIVE_RATIO must be a number, got 'x'"),
    ({"NEGATIVE_RATIO": "x"}, "NEGATIVE_RATIO must be a number, got 'x'"),
])
def test_invalid_config_names_key(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_concept_config({**CONFIG, **change})


def test_config_maps_labels_and_sorts_classes():
    concepts = parse_concept_config(CONFIG)
    assert concepts.prompts == ["a photo of red bus", "a photo of camera"]
    assert concepts.class_names == ["BACKGROUND", "bus", "camera"]
    assert concepts.background_per_concept == 1
    as_list = parse_concept_config({**CONFIG, "GROUP": ["red bus"]})
    assert as_list.concepts[0].class_name == "bus"


BUCKET_IDS = {"0": list(range(2000, 2008)), "1": list(range(3000, 3008))}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return tiny_clip_checkpoint(tmp_path_factory.getbasetemp() / "models")


@pytest.fixture
def embedded_store(artifact_root, tiny_checkpoint) -> ArtifactStore:
    """Two buckets of eight photos each, embedded with the tiny model."""
    store = ArtifactStore(artifact_root)
    samples = {i: make_jpeg(i, max_side=32) for ids in BUCKET_IDS.values() for i in ids}
    write_shard(store, "00000", samples)
    for bucket, ids in BUCKET_IDS.items():
        write_bucket(store, "default", bucket, "00000", ids)
        clip.run(clip.Config(artifact_root=artifact_root, split="default", bucket=bucket,
                             model="clear-tiny", checkpoint=str(tiny_checkpoint), workers=0,
                             device="cpu", chunk_size=3, precision="fp32"))
    return store


def curate_config(store, tmp_path, tiny_checkpoint, raw=None, **overrides) -> curate.Config:
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(raw or CONFIG))
    options = {"artifact_root": store.root, "config_path": str(path), "split": "default",
               "model": "clear-tiny", "checkpoint": str(tiny_checkpoint),
               "allow_small_classes": True, "device": "cpu"}
    return curate.Config(**{**options, **overrides})


def brute_force_top(store, bucket, text, size) -> list[list[int]]:
    """Each concept's best photo ids, computed from all embeddings at once."""
    manifest = store.read_json(f"features/default/clear-tiny/{bucket}/manifest.json")
    chunks = [clip.read_chunk(store, chunk["key"]) for chunk in manifest["chunks"]]
    ids = np.concatenate([c["photo_id"] for c in chunks])
    scores = np.concatenate([c["embedding_normalized"] for c in chunks]).astype(np.float64) @ \
        np.asarray(text, dtype=np.float64).T
    return [ids[np.lexsort((np.arange(len(ids)), -scores[:, c]))[:size]].tolist()
            for c in range(scores.shape[1])]


def test_curate_writes_clear_layout(embedded_store, tmp_path, tiny_checkpoint):
    from tasks.clip_models import embed_prompts, load_clip

    summary = curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint))
    dataset = embedded_store.path / "datasets" / "tiny-test"
    class_names = (dataset / "class_names.txt").read_text().split("\n")
    assert class_names == ["BACKGROUND", "bus", "camera"]
    assert summary["buckets_curated"] == ["0", "1"]
    assert json.loads((dataset / "concept_group_dict.json").read_text()) == CONFIG

    originals = {hashlib.sha256(make_jpeg(i, 32)).hexdigest()
                 for ids in BUCKET_IDS.values() for i in ids}
    index = json.loads((dataset / "labeled_metadata.json").read_text())
    assert sorted(index) == ["0", "1"]
    for bucket in ("0", "1"):
        lines = (dataset / "filelists" / f"{bucket}.txt").read_text().splitlines()
        for line in lines:
            path, label = line.rsplit(" ", 1)
            assert path.split("/")[2] == class_names[int(label)]
            assert hashlib.sha256((dataset / path).read_bytes()).hexdigest() in originals
        for class_name in class_names:
            metadata = json.loads((dataset / index[bucket][class_name]).read_text())
            assert len(metadata) == summary["counts"][bucket][class_name]
            for photo_id, entry in metadata.items():
                assert entry["IMG_PATH"] == f"labeled_images/{bucket}/{class_name}/{photo_id}.jpg"
        assert summary["counts"][bucket]["bus"] == 2
        assert summary["counts"][bucket]["camera"] == 2
        sheet = Image.open(io.BytesIO((dataset / "report" / f"contact_sheet_{bucket}.png")
                                      .read_bytes()))
        assert sheet.format == "PNG"

    loaded = load_clip("clear-tiny", checkpoint=str(tiny_checkpoint))
    prompts = ["a photo of red bus", "a photo of camera"]
    text = embed_prompts(loaded.model, loaded.tokenizer, prompts)
    clip_result = json.loads((dataset / "clip_result.json").read_text())
    for bucket in ("0", "1"):
        expected = brute_force_top(embedded_store, bucket, text, 2)
        assert [e["photo_id"] for e in clip_result[bucket]["bus"]] == expected[0]
        assert [e["photo_id"] for e in clip_result[bucket]["camera"]] == expected[1]

    csv_lines = (dataset / "report" / "counts.csv").read_text().splitlines()
    assert csv_lines[0] == "bucket,BACKGROUND,bus,camera,total"
    assert csv_lines[-1].startswith("total,")


def test_rerun_skips_finished_buckets(embedded_store, tmp_path, tiny_checkpoint):
    config = curate_config(embedded_store, tmp_path, tiny_checkpoint)
    first = curate.run(config)
    filelist = embedded_store.path / "datasets" / "tiny-test" / "filelists" / "0.txt"
    written_at = filelist.stat().st_mtime_ns
    second = curate.run(config)
    assert second["buckets_skipped"] == ["0", "1"]
    assert second["counts"] == first["counts"]
    assert filelist.stat().st_mtime_ns == written_at


def test_exclude_bucket(embedded_store, tmp_path, tiny_checkpoint):
    summary = curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint,
                                       exclude_buckets=("0",)))
    assert summary["buckets_curated"] == ["1"]
    assert list(summary["counts"]) == ["1"]


def test_changed_config_same_name_fails(embedded_store, tmp_path, tiny_checkpoint):
    curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint, buckets=("0",)))
    changed = {**CONFIG, "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY": 4}
    with pytest.raises(StageError, match="NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY") as error:
        curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint, raw=changed,
                                 buckets=("1",)))
    assert "finished bucket(s) 0," in str(error.value)


def test_failed_run_does_not_pin_config(embedded_store, tmp_path, tiny_checkpoint):
    # Each bucket has 8 photos, so 9 per class cannot be met.
    too_large = {**CONFIG, "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET": 9,
                 "NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY": 9}
    with pytest.raises(StageError) as error:
        curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint, raw=too_large,
                                 allow_small_classes=False))
    assert "the bucket has only 8 embedded images" in str(error.value)
    assert "_TO_QUERY" not in str(error.value)

    summary = curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint))

    assert summary["buckets_curated"] == ["0", "1"]
    dataset = embedded_store.path / "datasets" / "tiny-test"
    assert json.loads((dataset / "concept_group_dict.json").read_text()) == CONFIG


def test_rerun_after_wrong_checkpoint_succeeds(embedded_store, tmp_path, tiny_checkpoint):
    from tasks.clip_models import write_tiny_checkpoint

    other = tmp_path / "other-seed.pt"
    write_tiny_checkpoint(other, seed=1)
    with pytest.raises(StageError, match="checkpoint_sha256"):
        curate.run(curate_config(embedded_store, tmp_path, other))
    dataset = embedded_store.path / "datasets" / "tiny-test"
    assert not (dataset / "curate_options.json").exists()

    summary = curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint))

    assert summary["buckets_curated"] == ["0", "1"]


def test_killed_run_leftovers_removed(embedded_store, tmp_path, tiny_checkpoint):
    curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint, buckets=("0",)))
    dataset = embedded_store.path / "datasets" / "tiny-test"
    # What a process killed while writing bucket 1 leaves: renamed and temporary files.
    leftovers = [dataset / "labeled_images/1/camera/3001.jpg",
                 dataset / "labeled_images/1/camera/.3002.jpg.tmp-25843-a10c638d",
                 dataset / "labeled_metadata/1/.bus.json.tmp-25843-0badf00d",
                 dataset / "filelists/.1.txt.tmp-25843-12345678"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint, buckets=("1",)))

    for path in leftovers[1:]:
        assert not path.exists(), path
    temporary = [path for path in dataset.rglob("*") if ".tmp-" in path.name]
    assert temporary == []


@pytest.fixture
def segmented_store(artifact_root) -> ArtifactStore:
    """Buckets 0 and 1 of split `default`, without embeddings."""
    store = ArtifactStore(artifact_root)
    write_shard(store, "00000", {i: make_jpeg(i, max_side=32) for i in (1, 2)})
    write_bucket(store, "default", "0", "00000", [1])
    write_bucket(store, "default", "1", "00000", [2])
    return store


@pytest.mark.parametrize(("buckets", "excluded"), [(None, ("0", "1")), (("0",), ("0",))])
def test_every_bucket_excluded_rejected(segmented_store, tmp_path, tiny_checkpoint, buckets,
                                        excluded):
    config = curate_config(segmented_store, tmp_path, tiny_checkpoint, buckets=buckets,
                           exclude_buckets=excluded)
    with pytest.raises(ConfigError, match="no bucket left to curate"):
        curate.run(config)
    assert not (segmented_store.path / "datasets").exists()


def test_unknown_bucket_lists_known(embedded_store, tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match="known buckets: 0, 1"):
        curate.run(curate_config(embedded_store, tmp_path, tiny_checkpoint, buckets=("9",)))


def test_other_checkpoint_than_features_fails(embedded_store, tmp_path, tiny_checkpoint):
    from tasks.clip_models import write_tiny_checkpoint

    other = tmp_path / "other-seed.pt"
    write_tiny_checkpoint(other, seed=1)
    with pytest.raises(StageError, match="checkpoint_sha256"):
        curate.run(curate_config(embedded_store, tmp_path, other, buckets=("0",)))
