import io

import pyarrow.parquet as pq
import pytest

from tasks import metadata, shards
from tasks.errors import StageError
from tasks.storage import ArtifactStore

from pipeline_inputs import plan_sample, sample_photos


def planned_ids(root):
    store = ArtifactStore(root)
    plan = store.read_json(shards.PLAN_KEY)
    return {shard["id"]: pq.read_table(io.BytesIO(store.read_bytes(shard["key"])))
            ["photo_id"].to_pylist() for shard in plan["shards"]}


def test_plan_applies_clear_filters(artifact_root, sample_tsv):
    summary = plan_sample(artifact_root, sample_tsv, shard_size=200)

    expected = sample_photos(sample_tsv)
    ids = planned_ids(artifact_root)
    assert summary["shards"] == ["00000", "00001", "00002"]
    assert sum(len(v) for v in ids.values()) == len(expected) == summary["samples"]
    assert [len(ids[s]) for s in summary["shards"]] == [200, 200, len(expected) - 400]
    flat = [photo_id for s in summary["shards"] for photo_id in ids[s]]
    assert flat == [p["photo_id"] for p in sorted(expected, key=lambda p: p["line"])]


def test_appended_metadata_keeps_shard_ids(tmp_path, artifact_root, sample_tsv):
    source = tmp_path / "dataset.tsv"
    lines = sample_tsv.read_text().splitlines(keepends=True)
    source.write_text("".join(lines[:300]))
    plan_sample(artifact_root, source, shard_size=100)
    before = planned_ids(artifact_root)
    source.write_text("".join(lines))

    summary = plan_sample(artifact_root, source, shard_size=100)

    after = planned_ids(artifact_root)
    assert {k: after[k] for k in before} == before
    assert summary["new_shards"] == sorted(set(after) - set(before))
    assert len({p for ids in after.values() for p in ids}) == len(sample_photos(sample_tsv))


def test_duplicate_urls_are_dropped(tmp_path, artifact_root, sample_tsv):
    lines = sample_tsv.read_text().splitlines()
    fields = lines[1].split("\t")
    fields[0], fields[1] = "9999", "123456789"  # same URL and hash, new line and id
    source = tmp_path / "dup.tsv"
    source.write_text("\n".join([*lines, "\t".join(fields)]) + "\n")

    summary = plan_sample(artifact_root, source)

    assert summary["samples"] == len(sample_photos(sample_tsv))


def test_license_year_and_user_filters(artifact_root, sample_tsv):
    summary = plan_sample(artifact_root, sample_tsv, licenses=("Attribution License",),
                          min_year=2010, max_year=2012, max_per_user=1)

    table = metadata.load_metadata(ArtifactStore(artifact_root))
    rows = {r["photo_id"]: r for r in table.to_pylist()}
    ids = [p for v in planned_ids(artifact_root).values() for p in v]
    assert 0 < summary["samples"] == len(ids)
    assert all(rows[p]["license_name"] == "Attribution License" for p in ids)
    assert all(2010 <= rows[p]["date_uploaded"].year <= 2012 for p in ids)
    assert len({rows[p]["user_nsid"] for p in ids}) == len(ids)


def test_changed_options_are_rejected(artifact_root, sample_tsv):
    plan_sample(artifact_root, sample_tsv, shard_size=200)

    with pytest.raises(StageError, match="planned with"):
        shards.run(shards.Config(artifact_root, 100))


def test_plan_without_metadata_fails_clearly(artifact_root):
    with pytest.raises(StageError, match="run sync-metadata first"):
        shards.run(shards.Config(artifact_root))


def test_filters_matching_nothing_are_rejected(artifact_root, sample_tsv):
    with pytest.raises(StageError, match="Attribution License"):
        plan_sample(artifact_root, sample_tsv, licenses=("Nonexistent",))

    assert not ArtifactStore(artifact_root).exists(shards.PLAN_KEY)
