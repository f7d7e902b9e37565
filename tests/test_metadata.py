import bz2
import gzip
import json
import os
import urllib.parse
from datetime import datetime

import pytest
from metadata_inputs import write_lines, write_old_layout

from tasks import metadata, metadata_transfer
from tasks.cli import build_stage_parser
from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore


def convert(root, source, **options):
    source = source if isinstance(source, tuple) else str(source)
    return metadata.run(metadata.Config(root, source, **options))


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


def test_s3_source_and_root(s3_server, s3_root, sample_tsv, tmp_path):
    client = s3_server.client()
    key = s3_root.split("/", 3)[3] + "-source/yfcc100m_dataset.bz2"
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=bz2.compress(sample_tsv.read_bytes()))

    summary = convert(s3_root, f"s3://{s3_server.bucket}/{key}", cache_dir=str(tmp_path))

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


# The older 23-column layout and side files

def old_layout_options(files: dict, autotags: bool = True) -> dict:
    options = {"lines": str(files["lines"]), "hash": str(files["hash"])}
    if autotags:
        options["autotags"] = str(files["autotags"])
    return options


def test_old_layout_matches_25_column_layout(tmp_path, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    old_root, new_root = str(tmp_path / "old-root"), str(tmp_path / "new-root")

    summary = convert(old_root, tuple(str(p) for p in files["sources"]),
                      **old_layout_options(files))
    convert(new_root, sample_tsv)

    old = metadata.load_metadata(ArtifactStore(old_root))
    new = metadata.load_metadata(ArtifactStore(new_root))
    assert summary["rows"] == 600
    assert summary["rejected"] == 0
    assert old.schema == metadata.output_schema()
    assert old.drop_columns(["autotags"]).equals(new.drop_columns(["autotags"]))
    assert new.column("autotags").null_count == 600


def test_autotags_parsed_into_structs(tmp_path, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")

    convert(str(tmp_path / "root"), ",".join(str(p) for p in files["sources"]),
            **old_layout_options(files))

    table = metadata.load_metadata(ArtifactStore(str(tmp_path / "root")))
    empty = 0
    for row in table.select(["photo_id", "autotags"]).to_pylist():
        expected = files["expected_autotags"][row["photo_id"]]
        assert [tag["concept"] for tag in row["autotags"]] == [c for c, _ in expected]
        assert [tag["score"] for tag in row["autotags"]] == \
            pytest.approx([s for _, s in expected], abs=1e-6)
        empty += not expected
    assert 0 < empty < 600  # both photos with and without autotags occur


def test_autotags_with_25_column_layout(tmp_path, artifact_root, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")

    convert(artifact_root, sample_tsv, autotags=str(files["autotags"]))

    table = metadata.load_metadata(ArtifactStore(artifact_root))
    rows = table.select(["photo_id", "autotags"]).to_pylist()
    assert all(len(r["autotags"]) == len(files["expected_autotags"][r["photo_id"]])
               for r in rows)
    assert table.column("autotags").null_count == 0


def test_old_layout_from_s3_bz2(s3_server, s3_root, tmp_path, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    client = s3_server.client()
    prefix = s3_root.split("/", 3)[3] + "-source"

    def upload(path):
        client.upload_file(str(path), s3_server.bucket, f"{prefix}/{path.name}")
        return f"s3://{s3_server.bucket}/{prefix}/{path.name}"

    sources = [upload(path) for path in files["sources"]]
    side_files = {role: upload(files[role]) for role in ("lines", "hash", "autotags")}

    summary = convert(s3_root, tuple(sources), cache_dir=str(tmp_path / "cache"), **side_files)

    store = ArtifactStore(s3_root)
    manifest = store.read_json(metadata.MANIFEST_KEY)
    assert summary["rows"] == 600
    assert [d["etag_check"] for d in manifest["downloads"]] == ["md5"] * 6
    assert metadata.load_metadata(store, ["autotags"]).column("autotags").null_count == 0
    assert not list((tmp_path / "cache" / "sources").iterdir())  # converted downloads are removed


def test_side_file_id_mismatch_stops(tmp_path, artifact_root, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    hash_lines = bz2.decompress(files["hash"].read_bytes()).decode().splitlines()
    hash_lines[250], hash_lines[251] = hash_lines[251], hash_lines[250]
    write_lines(files["hash"], hash_lines)
    first_id, second_id = hash_lines[251].split("\t")[0], hash_lines[250].split("\t")[0]

    with pytest.raises(StageError, match="photo id mismatch") as raised:
        convert(artifact_root, tuple(str(p) for p in files["sources"]),
                **old_layout_options(files))

    message = str(raised.value)
    assert "line 51 of" in message and "yfcc100m_dataset-1.bz2" in message  # 200 per file
    assert "line 251 of the hash file" in message
    assert f"has id {first_id!r}" in message
    assert f"has id {second_id!r}" in message
    assert not ArtifactStore(artifact_root).exists(metadata.MANIFEST_KEY)


@pytest.mark.parametrize("change, message", [
    (lambda lines: lines[:-1], "ends after 599 lines"),
    (lambda lines: [*lines, lines[-1]], "has more lines than the 600 lines"),
])
def test_side_file_line_count_mismatch(tmp_path, artifact_root, sample_tsv, change, message):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    autotags = bz2.decompress(files["autotags"].read_bytes()).decode().splitlines()
    write_lines(files["autotags"], change(autotags))

    with pytest.raises(StageError, match=message):
        convert(artifact_root, tuple(str(p) for p in files["sources"]),
                **old_layout_options(files))


def test_dropped_dataset_line_keeps_side_files_aligned(tmp_path, artifact_root, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    second = files["sources"][1]
    lines = bz2.decompress(second.read_bytes()).decode().splitlines()
    lines[4] = "\t".join(lines[4].split("\t")[:10])  # too few columns
    lines[-1] = "\t".join(lines[-1].split("\t")[:10])  # a dropped last line
    write_lines(second, lines)

    summary = convert(artifact_root, tuple(str(p) for p in files["sources"]),
                      max_reject_fraction=0.1, **old_layout_options(files))

    store = ArtifactStore(artifact_root)
    manifest = store.read_json(metadata.MANIFEST_KEY)
    rejects = [json.loads(line) for line in store.read_text(manifest["rejects"]).splitlines()]
    assert summary["rows"] == 598
    assert [(r["source"], r["line"]) for r in rejects] == [(str(second), 5), (str(second), 200)]
    table = metadata.load_metadata(store, ["photo_id", "line_number", "autotags"])
    for row in table.to_pylist():
        assert len(row["autotags"]) == len(files["expected_autotags"][row["photo_id"]])
    assert sorted(table.column("line_number").to_pylist()) == sorted(
        int(line.split("\t")[0]) for i, line in enumerate(sample_tsv.read_text().splitlines())
        if i not in (204, 399))


def test_invalid_autotags_line_is_rejected(tmp_path, artifact_root, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    autotags = bz2.decompress(files["autotags"].read_bytes()).decode().splitlines()
    photo_id = autotags[7].split("\t")[0]
    autotags[7] = f"{photo_id}\tsky:high,tree:0.5"
    write_lines(files["autotags"], autotags)

    summary = convert(artifact_root, sample_tsv, autotags=str(files["autotags"]))

    store = ArtifactStore(artifact_root)
    manifest = store.read_json(metadata.MANIFEST_KEY)
    rejects = [json.loads(line) for line in store.read_text(manifest["rejects"]).splitlines()]
    assert summary["rows"] == 599
    assert rejects[0]["line"] == 8
    assert rejects[0]["reason"] == "autotags item is not concept:score"


def test_old_layout_without_side_files_fails(tmp_path, artifact_root, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    sources = tuple(str(p) for p in files["sources"])

    with pytest.raises(StageError, match="pass its side files with --lines and --hash"):
        convert(artifact_root, sources)
    with pytest.raises(ConfigError, match="needs both --lines and --hash"):
        convert(artifact_root, sources, lines=str(files["lines"]))
    with pytest.raises(StageError, match="pass it without --lines and --hash"):
        convert(artifact_root, sample_tsv, **old_layout_options(files))


def test_cli_repeated_and_comma_sources(tmp_path, sample_tsv):
    files = write_old_layout(sample_tsv, tmp_path / "old")
    parser = build_stage_parser("sync-metadata")
    first, second, third = (str(p) for p in files["sources"])

    args = parser.parse_args(["--artifact-root", str(tmp_path / "root"), "--source", first,
                              "--source", f"{second},{third}", "--lines", str(files["lines"]),
                              "--hash", str(files["hash"]), "--range-mib", "8"])
    config = metadata.Config.from_args(args)

    assert config.sources == (first, second, third)
    assert config.range_bytes == 8 << 20
    assert metadata.run(config)["rows"] == 600


# Resumable S3 downloads and the parallel bzip2 decoder

class InterruptedDownload(Exception):
    pass


class RecordingClient:
    """Wraps a boto3 S3 client, records each GET range and can fail after some GETs."""

    def __init__(self, client, fail_after: int | None = None):
        self._client = client
        self.fail_after = fail_after
        self.ranges: list[str] = []

    def get_object(self, **kwargs):
        if self.fail_after is not None and len(self.ranges) >= self.fail_after:
            raise InterruptedDownload(f"interrupted before range {kwargs['Range']}")
        self.ranges.append(kwargs["Range"])
        return self._client.get_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def put_source(s3_server, s3_root, name: str, data: bytes) -> str:
    key = s3_root.split("/", 3)[3] + f"-source/{name}"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=data)
    return f"s3://{s3_server.bucket}/{key}"


def test_interrupted_download_resumes(s3_server, s3_root, tmp_path, sample_tsv):
    data = bz2.compress(sample_tsv.read_bytes())
    uri = put_source(s3_server, s3_root, "yfcc100m_dataset.bz2", data)
    head = metadata_transfer.head_s3_object(uri)
    range_bytes = 32 << 10
    first = RecordingClient(s3_server.client(), fail_after=1)

    with pytest.raises(InterruptedDownload):
        metadata_transfer.fetch_s3_object(uri, head, tmp_path, first, range_bytes)
    _, part, _ = metadata_transfer.cache_paths(uri, tmp_path)
    assert part.read_bytes() == data[:range_bytes]

    second = RecordingClient(s3_server.client())
    path, check = metadata_transfer.fetch_s3_object(uri, head, tmp_path, second, range_bytes)

    assert first.ranges == [f"bytes=0-{range_bytes - 1}"]
    assert second.ranges[0] == f"bytes={range_bytes}-{2 * range_bytes - 1}"
    assert len(second.ranges) == -(-len(data) // range_bytes) - 1
    assert path.read_bytes() == data
    assert check == {"etag_check": "md5"}
    assert not part.exists()


def test_corrupt_part_fails_md5_check(s3_server, s3_root, tmp_path, sample_tsv):
    data = bz2.compress(sample_tsv.read_bytes())
    uri = put_source(s3_server, s3_root, "yfcc100m_dataset.bz2", data)
    head = metadata_transfer.head_s3_object(uri)
    with pytest.raises(InterruptedDownload):
        metadata_transfer.fetch_s3_object(uri, head, tmp_path,
                                          RecordingClient(s3_server.client(), 1), 32 << 10)
    _, part, _ = metadata_transfer.cache_paths(uri, tmp_path)
    part.write_bytes(b"\0" * part.stat().st_size)

    with pytest.raises(StageError, match="has MD5"):
        metadata_transfer.fetch_s3_object(uri, head, tmp_path, s3_server.client(), 32 << 10)

    assert not part.exists()
    path, _ = metadata_transfer.fetch_s3_object(uri, head, tmp_path, s3_server.client())
    assert path.read_bytes() == data


def test_multipart_etag_checks_size_only(s3_server, s3_root, tmp_path):
    client = s3_server.client()
    uri = put_source(s3_server, s3_root, "placeholder", b"")
    bucket, key = uri[len("s3://"):].split("/", 1)
    parts = [b"a" * (5 << 20), b"b" * 1000]
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    etags = [client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                PartNumber=number, Body=body)["ETag"]
             for number, body in enumerate(parts, start=1)]
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": number}
                                   for number, etag in enumerate(etags, start=1)]})
    head = metadata_transfer.head_s3_object(uri, client)

    path, check = metadata_transfer.fetch_s3_object(uri, head, tmp_path, client)

    assert "-" in head["etag"]
    assert check == {"etag_check": "multipart ETag, size only"}
    assert path.read_bytes() == b"".join(parts)


def test_unchanged_s3_source_is_not_downloaded(s3_server, s3_root, tmp_path, sample_tsv,
                                                monkeypatch):
    uri = put_source(s3_server, s3_root, "yfcc100m_dataset.bz2",
                     bz2.compress(sample_tsv.read_bytes()))
    convert(s3_root, uri, cache_dir=str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("an unchanged S3 source was downloaded again")

    monkeypatch.setattr(metadata, "fetch_s3_object", no_download)
    assert convert(s3_root, uri, cache_dir=str(tmp_path))["changed"] is False


def test_rapidgzip_decoder_reads_bz2(tmp_path, sample_tsv):
    source = tmp_path / "d.bz2"
    data = bz2.compress(sample_tsv.read_bytes())
    source.write_bytes(data)
    truncated = tmp_path / "truncated.bz2"
    truncated.write_bytes(data[: len(data) // 2])

    summary = convert(str(tmp_path / "root"), source, decoder="rapidgzip")

    assert summary["rows"] == 600
    with pytest.raises(StageError, match="truncated.bz2"):
        convert(str(tmp_path / "root-truncated"), truncated, decoder="rapidgzip")


@pytest.mark.parametrize("alphabet", ["%+g4,17x", "%+aF0g,9\u00e9"])
def test_vectorized_url_decode_matches_unquote_plus(alphabet):
    import random

    import pyarrow as pa

    from tasks.metadata_convert import _url_decode

    rng = random.Random(0)
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
              for _ in range(20000)]

    decoded = _url_decode(pa.array(values)).to_pylist()

    mismatches = [v for v, d in zip(values, decoded, strict=True)
                  if d != urllib.parse.unquote_plus(v)]
    assert mismatches == []


def test_touched_unchanged_source_is_a_no_op(tmp_path, artifact_root, sample_tsv):
    source = tmp_path / "dataset.tsv"
    source.write_bytes(sample_tsv.read_bytes())
    convert(artifact_root, source)
    os.utime(source, ns=(1, 1))

    assert convert(artifact_root, source)["changed"] is False


def test_same_size_new_content_is_converted(tmp_path, artifact_root, sample_tsv):
    source = tmp_path / "dataset.tsv"
    data = sample_tsv.read_bytes()
    source.write_bytes(data)
    convert(artifact_root, source)
    source.write_bytes(data.replace(b"Canon", b"Kanon", 1))
    os.utime(source, ns=(2, 2))

    summary = convert(artifact_root, source)

    assert summary["changed"] is True
    devices = metadata.load_metadata(ArtifactStore(artifact_root))["device"].to_pylist()
    assert "Kanon PowerShot ELPH 310 HS" in devices
    manifest = ArtifactStore(artifact_root).read_json(metadata.MANIFEST_KEY)
    assert len(manifest["sources"][0]["sha256"]) == 64


def test_url_decode_of_sliced_array():
    import pyarrow as pa

    from tasks.metadata_convert import _url_decode

    values = ["a+b", "%41%42", "x%2By", "plain", None, "c%20d"]

    decoded = _url_decode(pa.array(values).slice(2, 4)).to_pylist()

    assert decoded == ["x+y", "plain", None, "c d"]
