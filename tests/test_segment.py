import io
import json
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import segment
from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore

from pipeline_inputs import mark_downloaded, plan_sample, sample_photos

CLEAR10_RANGES = Path(__file__).parent / "data" / "clear10_time_ranges.json"


@pytest.fixture
def downloaded_root(artifact_root, sample_tsv):
    plan_sample(artifact_root, sample_tsv)
    mark_downloaded(artifact_root)
    return artifact_root


def split_with(root, **options) -> dict:
    return segment.run(segment.Config(root, **options))


def bucket_ids(root, split, bucket) -> list[int]:
    key = segment.find_bucket_key(ArtifactStore(root), split, bucket)
    return pq.read_table(io.BytesIO(ArtifactStore(root).read_bytes(key)))["photo_id"].to_pylist()


def ordered(photos):
    return sorted(photos, key=lambda p: (p["uploaded"], p["line"], p["photo_id"]))


def test_year_mode_counts(downloaded_root, sample_tsv):
    summary = split_with(downloaded_root, split="years", mode="year", first_year=2005,
                         last_year=2014)

    expected = Counter(p["uploaded"].year for p in sample_photos(sample_tsv))
    assert summary["buckets"] == [str(i) for i in range(10)]
    for index, year in enumerate(range(2005, 2015)):
        assert len(bucket_ids(downloaded_root, "years", str(index))) == expected[year]


def test_year_mode_empty_bucket_is_an_error(downloaded_root):
    with pytest.raises(StageError, match="empty"):
        split_with(downloaded_root, mode="year", first_year=2004, last_year=2014)

    summary = split_with(downloaded_root, mode="year", first_year=2004, last_year=2014,
                         allow_empty_buckets=True)
    assert len(summary["buckets"]) == 11


def test_equal_mode_is_ordered_and_balanced(downloaded_root, sample_tsv):
    split_with(downloaded_root, split="eq", mode="equal", buckets=4)

    photos = ordered(sample_photos(sample_tsv))
    sizes = [len(bucket_ids(downloaded_root, "eq", str(i))) for i in range(4)]
    flat = [p for i in range(4) for p in bucket_ids(downloaded_root, "eq", str(i))]
    assert max(sizes) - min(sizes) <= 1
    assert flat == [p["photo_id"] for p in photos]


def test_clear10_ranges_counts(downloaded_root, sample_tsv):
    ranges = segment.parse_ranges(CLEAR10_RANGES.read_text(), "clear10")
    config = segment.Config(downloaded_root, split="clear10", mode="ranges",
                            ranges=tuple((s.isoformat(), e.isoformat()) for s, e in ranges))

    segment.run(config)

    for index, (start, end) in enumerate(ranges):
        low, high = start.replace(tzinfo=None), end.replace(tzinfo=None)
        expected = [p["photo_id"] for p in ordered(sample_photos(sample_tsv))
                    if low <= p["uploaded"] <= high]
        assert bucket_ids(downloaded_root, "clear10", str(index)) == expected
    summary = ArtifactStore(downloaded_root).read_json(segment.summary_key("clear10"))
    assert [b["samples"] for b in summary["buckets"]] == [
        len(bucket_ids(downloaded_root, "clear10", str(i))) for i in range(11)]
    assert all(b["samples"] > 0 for b in summary["buckets"])


def test_failed_samples_are_left_out(artifact_root, sample_tsv):
    plan_sample(artifact_root, sample_tsv)
    failed = {p["photo_id"] for p in sample_photos(sample_tsv)[:10]}
    mark_downloaded(artifact_root, failed=failed)

    split_with(artifact_root, mode="equal", buckets=1)

    ids = set(bucket_ids(artifact_root, "default", "0"))
    assert not ids & failed
    assert len(ids) == len(sample_photos(sample_tsv)) - 10


def test_summary_describes_buckets(downloaded_root):
    split_with(downloaded_root, mode="equal", buckets=2)

    summary = ArtifactStore(downloaded_root).read_json(segment.summary_key("default"))
    first, second = summary["buckets"]
    assert first["last_upload"] <= second["first_upload"]
    assert {"samples", "first_upload", "last_upload", "min_line", "max_line"} <= set(first)


def test_rerun_is_a_no_op_and_other_options_are_rejected(downloaded_root):
    split_with(downloaded_root, mode="equal", buckets=2)

    assert split_with(downloaded_root, mode="equal", buckets=2)["changed"] is False
    with pytest.raises(StageError, match="choose another --split"):
        split_with(downloaded_root, mode="equal", buckets=3)


@pytest.mark.parametrize("ranges, message", [
    ([{"start": "2010-01-01 00:00:00.0", "end": "2009-01-01 00:00:00.0"}], "before it starts"),
    ([{"start": "2008-01-01 00:00:00.0", "end": "2009-01-01 00:00:00.0"},
      {"start": "2008-06-01 00:00:00.0", "end": "2010-01-01 00:00:00.0"}], "must not overlap"),
    ([{"start": "2010-13-01", "end": "2011-01-01"}], "invalid time"),
    ([{"begin": "2010-01-01"}], "'start' and 'end'"),
    ([], "non-empty JSON list"),
])
def test_invalid_ranges(ranges, message):
    with pytest.raises(ConfigError, match=message):
        segment.parse_ranges(json.dumps(ranges), "ranges.json")


def test_ranges_timestamps_are_utc():
    (start, end), = segment.parse_ranges(
        '[{"start": "2004-01-01 11:52:13.0", "end": "2007-04-09 03:27:17.0"}]', "x")
    assert start.replace(tzinfo=None) == datetime(2004, 1, 1, 11, 52, 13)
    assert end.utcoffset().total_seconds() == 0


def test_concurrent_segment_is_rejected(downloaded_root):
    store = ArtifactStore(downloaded_root)

    with store.exclusive("buckets/default.lock"), pytest.raises(StageError, match="locked"):
        split_with(downloaded_root, mode="equal", buckets=2)


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_split_name_must_be_one_folder(name):
    from argparse import Namespace

    args = Namespace(artifact_root="x", split=name, mode="equal", years="2004-2014", buckets=2,
                     ranges_file="", allow_empty_buckets=False)
    with pytest.raises(ConfigError, match="invalid --split"):
        segment.Config.from_args(args)


def test_many_empty_buckets_message_is_short(downloaded_root):
    with pytest.raises(StageError) as error:
        split_with(downloaded_root, mode="equal", buckets=5000)

    assert len(str(error.value)) < 400
    assert "empty" in str(error.value)


def test_new_shard_makes_new_bucket_version(artifact_root, sample_tsv):
    plan_sample(artifact_root, sample_tsv)
    mark_downloaded(artifact_root)
    store = ArtifactStore(artifact_root)
    store.delete("images/shard-00002.stats.json")
    split_with(artifact_root, mode="equal", buckets=2)
    first = store.read_json(segment.summary_key("default"))
    mark_downloaded(artifact_root)

    summary = split_with(artifact_root, mode="equal", buckets=2)

    second = store.read_json(segment.summary_key("default"))
    assert summary["changed"] is True
    assert second["version"] != first["version"]
    assert second["samples"] == len(sample_photos(sample_tsv)) > first["samples"]
    assert not store.list(f"buckets/default/{first['version']}/")
    assert all(store.exists(bucket["key"]) for bucket in second["buckets"])
