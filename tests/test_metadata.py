import bz2
import gzip
import json
import urllib.parse
from datetime import datetime

import pytest

from tasks import metadata
from tasks.errors import StageError
from tasks.storage import ArtifactStore


def convert(root, source, **options):
    return metadata.run(metadata.Config(root, str(source), **options))


def raw_lines(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_sample_rows_types_and_values(artifact_root, sample_tsv):
    summary = convert(artifact_root, sample_tsv)
    table = metadata.load_metadata(ArtifactStore(artifact_root))
    rows = {row["photo_id"]: row for row in table.to_pylist()}

    assert summary["rows"] == 600
    assert summary["rejected"] == 0
    assert table.schema == metadata.output_schema()
    for fields in raw_lines(sample_tsv):
        row = rows[int(fields[1])]
        assert row["line_number"] == int(fields[0])
        assert row["hash"] == fields[2]
        assert row["date_uploaded"] == datetime.utcfromtimestamp(int(fields[6]))
        assert row["title"] == urllib.parse.unquote_plus(fields[8])
        assert row["download_url"] == fields[16]
        assert row["is_video"] == (fields[24] == "1")
        expected_tags = [urllib.parse.unquote_plus(t) for t in fields[10].split(",") if t]
        assert row["user_tags"] == expected_tags
        if fields[12]:
            assert row["longitude"] == pytest.approx(float(fields[12]))


def test_compressed_sources(tmp_path, sample_tsv):
    data = sample_tsv.read_bytes()
    (tmp_path / "d.bz2").write_bytes(bz2.compress(data))
    (tmp_path / "d.gz").write_bytes(gzip.compress(data))

    for name in ("d.bz2", "d.gz"):
        root = str(tmp_path / f"root-{name}")
        assert convert(root, tmp_path / name)["rows"] == 600


def test_s3_source_and_root(s3_server, s3_root, sample_tsv):
    client = s3_server.client()
    key = s3_root.split("/", 3)[3] + "-source/yfcc100m_dataset.bz2"
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=bz2.compress(sample_tsv.read_bytes()))

    summary = convert(s3_root, f"s3://{s3_server.bucket}/{key}")

    assert summary["rows"] == 600
    assert metadata.load_metadata(ArtifactStore(s3_root)).num_rows == 600


def test_unchanged_source_is_a_no_op(artifact_root, sample_tsv):
    convert(artifact_root, sample_tsv)
    store = ArtifactStore(artifact_root)
    before = {key: store.read_bytes(key) for key in store.list("metadata/")}

    summary = convert(artifact_root, sample_tsv)

    assert summary["changed"] is False
    assert {key: store.read_bytes(key) for key in store.list("metadata/")} == before


def test_changed_source_replaces_all_parts(tmp_path, artifact_root, sample_tsv):
    source = tmp_path / "dataset.tsv"
    lines = sample_tsv.read_text().splitlines(keepends=True)
    source.write_text("".join(lines[:100]))
    convert(artifact_root, source, part_rows=30)
    source.write_text("".join(lines[:250]))

    convert(artifact_root, source, part_rows=30)

    store = ArtifactStore(artifact_root)
    manifest = store.read_json(metadata.MANIFEST_KEY)
    parts = [key for key in store.list("metadata/") if key.endswith(".parquet")]
    assert sorted(parts) == sorted(part["key"] for part in manifest["parts"])
    assert len(parts) == 9
    assert metadata.load_metadata(store).num_rows == 250


def test_malformed_lines_go_to_rejects(tmp_path, artifact_root, sample_tsv):
    lines = sample_tsv.read_text().splitlines()
    bad = list(lines[:20])
    bad[3] = "\t".join(lines[3].split("\t")[:20])                 # too few columns
    fields = lines[5].split("\t")
    bad[5] = "\t".join([fields[0], "notanumber", *fields[2:]])   # non-numeric photo id
    fields = lines[7].split("\t")
    bad[7] = "\t".join([*fields[:6], "-5", *fields[7:]])         # non-numeric upload time
    fields = lines[9].split("\t")
    bad[9] = "\t".join([*fields[:6], "99999999999", *fields[7:]])  # upload after 2100
    source = tmp_path / "bad.tsv"
    source.write_text("\n".join(bad) + "\n")

    summary = convert(artifact_root, source, max_reject_fraction=0.5)

    store = ArtifactStore(artifact_root)
    manifest = store.read_json(metadata.MANIFEST_KEY)
    rejects = [json.loads(line) for line in store.read_text(manifest["rejects"]).splitlines()]
    assert summary["rows"] == 16
    assert sorted(r["line"] for r in rejects) == [4, 6, 8, 10]  # 1-based physical lines
    assert any("columns" in r["reason"] for r in rejects)
    assert any("impossible upload time" in r["reason"] for r in rejects)


def test_too_many_rejects_fails_and_keeps_previous(tmp_path, artifact_root, sample_tsv):
    convert(artifact_root, sample_tsv)
    source = tmp_path / "broken.tsv"
    source.write_text("just\tthree\tcolumns\n" * 10)

    with pytest.raises(StageError, match="malformed"):
        convert(artifact_root, source)

    assert metadata.load_metadata(ArtifactStore(artifact_root)).num_rows == 600


def test_missing_source_names_the_path(artifact_root, tmp_path):
    with pytest.raises(StageError, match="nope.tsv"):
        convert(artifact_root, tmp_path / "nope.tsv")


def test_missing_date_taken_is_null_with_flag(tmp_path, artifact_root, sample_tsv):
    fields = sample_tsv.read_text().splitlines()[0].split("\t")
    fields[5] = "null"
    source = tmp_path / "one.tsv"
    source.write_text("\t".join(fields) + "\n")

    convert(artifact_root, source)

    row = metadata.load_metadata(ArtifactStore(artifact_root)).to_pylist()[0]
    assert row["date_taken"] is None
    assert row["date_taken_valid"] is False


def test_invalid_utf8_line_is_rejected(tmp_path, artifact_root, sample_tsv):
    lines = sample_tsv.read_bytes().split(b"\n")
    fields = lines[4].split(b"\t")
    fields[8] = b"bad\xff\xfetitle"
    lines[4] = b"\t".join(fields)
    source = tmp_path / "bad-utf8.tsv"
    source.write_bytes(b"\n".join(lines))

    summary = convert(artifact_root, source)

    store = ArtifactStore(artifact_root)
    manifest = store.read_json(metadata.MANIFEST_KEY)
    rejects = [json.loads(line) for line in store.read_text(manifest["rejects"]).splitlines()]
    assert summary["rows"] == 599
    assert rejects[0]["line"] == 5
    assert rejects[0]["reason"] == "invalid UTF-8 in column title"


@pytest.mark.parametrize("name, data, message", [
    ("empty.tsv", b"", "Empty CSV file"),
    ("plain.gz", b"0\t1\t2\n", "incorrect header check"),
    ("truncated.gz", gzip.compress(b"x" * 1000)[:20], "Truncated compressed stream"),
])
def test_unreadable_source_fails_clearly(tmp_path, artifact_root, name, data, message):
    source = tmp_path / name
    source.write_bytes(data)

    with pytest.raises(StageError, match=message):
        convert(artifact_root, source)
