"""Tests of the download stage against local HTTP servers on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import download
from tasks.cli import build_stage_parser, main
from tasks.download.writer import ShardWriter, padded_size
from tasks.errors import ConfigError, StageError
from tasks.images import decode_image
from tasks.sample_mirror import SampleMirror
from tasks.storage import ArtifactStore

from builders import make_jpeg, make_photo
from faulty_server import FaultyServer, Reply

ROOT = Path(__file__).resolve().parent.parent
# Options that let the small test photos through and keep retries fast.
FAST_OPTIONS = ["--timeout", "0.5", "--retries", "1", "--backoff-base", "0.01",
                "--min-size", "100", "--min-edge", "16", "--max-aspect-ratio", "4",
                "--max-pixels", "4000000", "--concurrency", "8", "--per-host", "8"]


@pytest.fixture
def server():
    server = FaultyServer().start()
    yield server
    server.stop()


def write_plan(root: str, urls: dict[int, str], shard_id: str = "00000") -> None:
    """Write shards/plan.json and one shard Parquet file listing `urls` by photo id."""
    store = ArtifactStore(root)
    count = len(urls)
    table = pa.table({
        "photo_id": pa.array(list(urls), pa.int64()),
        "line_number": pa.array(range(count), pa.int64()),
        "hash": pa.array([f"{photo_id:x}" for photo_id in urls], pa.string()),
        "download_url": pa.array(list(urls.values()), pa.string()),
        "extension": pa.array(["jpg"] * count, pa.string()),
        "date_uploaded": pa.array([1_300_000_000 + i for i in range(count)], pa.timestamp("s")),
        "date_taken": pa.array([1_200_000_000 + i for i in range(count)], pa.timestamp("s")),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    key = f"shards/shard-{shard_id}.parquet"
    store.write_bytes(key, sink.getvalue())
    store.write_json("shards/plan.json", {"format": 1, "shard_size": count, "shards": [
        {"id": shard_id, "key": key, "samples": count}]})


def make_config(root: str, *options: str) -> download.Config:
    args = build_stage_parser("download").parse_args(
        ["--artifact-root", root, "--shard", "00000", *options])
    return download.Config.from_args(args)


def read_manifest(root: str) -> dict[int, dict]:
    table = pq.read_table(Path(root) / "images" / "shard-00000.parquet")
    return {row["photo_id"]: row for row in table.to_pylist()}


def read_tar(root: str) -> dict[str, bytes]:
    with tarfile.open(Path(root) / "images" / "shard-00000.tar") as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def encode(image: Image.Image, fmt: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


@functools.lru_cache
def bomb_png(side: int) -> bytes:
    """A 1-bit grayscale PNG of side x side black pixels, a few KB compressed."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rotated_jpeg() -> bytes:
    """A 120x80 stored photo whose EXIF orientation 6 displays it as 80x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(make_photo(3, 120).resize((120, 80)), "JPEG", exif=exif.tobytes())


def fault_cases(server: FaultyServer) -> dict[int, tuple[str, str]]:
    """Route one misbehaving URL per case; return photo id -> (url, expected status)."""
    photo = make_jpeg(1)
    placeholder = encode(make_photo(2, 64), "PNG")
    truncated_jpeg = make_jpeg(4)[:600]
    cases = {
        1: ("/ok/1_aa.jpg", [Reply(body=photo)], "ok"),
        2: ("/missing/2_aa.jpg", [Reply(404, b"gone")], "http_error"),
        3: ("/broken/3_aa.jpg", [Reply(500, b"oops")], "http_error"),
        4: ("/busy/4_aa.jpg", [Reply(503, b"busy", {"Retry-After": "1"}),
                               Reply(body=make_jpeg(5))], "ok"),
        5: ("/stalled/5_aa.jpg", [Reply(body=photo, delay=2.0)], "timeout"),
        6: ("/cut/6_aa.jpg", [Reply(body=photo[:500], declared_length=len(photo))],
            "truncated"),
        7: ("/deleted/7_aa.jpg", [Reply(302, b"", {"Location": "/images/photo_unavailable.png"})],
            "unavailable"),
        8: ("/html/8_aa.jpg", [Reply(body=b"<html><body>" + b"x" * 500 + b"</body></html>",
                                     headers={"Content-Type": "text/html"})], "not_image"),
        9: ("/empty/9_aa.jpg", [Reply(body=b"")], "empty"),
        10: ("/bomb/10_aa.jpg", [Reply(body=bomb_png(9000))], "too_many_pixels"),
        11: ("/huge/11_aa.jpg", [Reply(body=bomb_png(20000)[:400])], "too_many_pixels"),
        12: ("/cmyk/12_aa.jpg", [Reply(body=encode(make_photo(12, 64).convert("CMYK"),
                                                   "JPEG"))], "ok"),
        13: ("/png/13_aa.jpg", [Reply(body=encode(make_photo(13, 64), "PNG"))], "ok"),
        14: ("/rotated/14_aa.jpg", [Reply(body=rotated_jpeg())], "ok"),
        15: ("/wide/15_aa.jpg", [Reply(body=encode(make_photo(15, 400).resize((400, 40)),
                                                   "JPEG"))], "filtered_aspect_ratio"),
        16: ("/tiny/16_aa.jpg", [Reply(body=encode(make_photo(16, 8).resize((8, 8)),
                                                   "PNG"))], "filtered_min_edge"),
        17: ("/small/17_aa.gif", [Reply(body=encode(Image.new("P", (1, 1)), "GIF"))],
             "too_small"),
        18: ("/corrupt/18_aa.jpg", [Reply(body=truncated_jpeg)], "invalid_image"),
        19: ("/palette/19_aa.gif", [Reply(body=encode(make_photo(19, 64).convert("P"),
                                                      "GIF"))], "ok"),
    }
    server.route("/images/photo_unavailable.png", Reply(body=placeholder))
    urls = {photo_id: (server.route(path, *replies), status)
            for photo_id, (path, replies, status) in cases.items()}
    urls[20] = (f"http://127.0.0.1:{free_port()}/refused/20_aa.jpg", "connection_error")
    return urls


def test_download_fault_statuses(server, artifact_root):
    cases = fault_cases(server)
    write_plan(artifact_root, {photo_id: url for photo_id, (url, _) in cases.items()})

    summary = download.run(make_config(artifact_root, *FAST_OPTIONS))

    manifest = read_manifest(artifact_root)
    assert summary["samples"] == len(cases)
    for photo_id, (_, expected) in cases.items():
        row = manifest[photo_id]
        assert row["status"] == expected, (photo_id, row)
        assert (row["error"] is None) == (expected == "ok"), row
    assert manifest[2]["http_status"] == 404
    assert manifest[2]["attempts"] == 1
    assert manifest[3]["http_status"] == 500
    assert manifest[3]["attempts"] == 2
    assert manifest[5]["attempts"] == 2
    assert manifest[6]["attempts"] == 2
    assert manifest[20]["attempts"] == 2


def test_unreachable_shard_warns_on_each_run(artifact_root, caplog):
    closed_port = f"http://127.0.0.1:{free_port()}/refused"
    write_plan(artifact_root, {1: f"{closed_port}/1_aa.jpg", 2: f"{closed_port}/2_aa.jpg"})

    download.run(make_config(artifact_root, *FAST_OPTIONS))
    first = caplog.text
    caplog.clear()
    summary = download.run(make_config(artifact_root, *FAST_OPTIONS))

    assert "no sample was downloaded (connection_error: 2)" in first
    assert summary["skipped"]
    assert "2 of 2 samples failed (connection_error: 2)" in caplog.text
    assert "--retry-failed" in caplog.text


def test_download_retry_after_honoured(server, artifact_root):
    cases = fault_cases(server)
    write_plan(artifact_root, {4: cases[4][0]})

    download.run(make_config(artifact_root, *FAST_OPTIONS))

    row = read_manifest(artifact_root)[4]
    first, second = server.request_times["/busy/4_aa.jpg"]
    assert row["status"] == "ok"
    assert row["attempts"] == 2
    assert second - first >= 0.9


def test_download_ok_rows_describe_tar(server, artifact_root):
    cases = fault_cases(server)
    ok_ids = [12, 13, 14, 19]
    write_plan(artifact_root, {photo_id: cases[photo_id][0] for photo_id in ok_ids})

    download.run(make_config(artifact_root, *FAST_OPTIONS))

    manifest = read_manifest(artifact_root)
    members = read_tar(artifact_root)
    tar_bytes = (Path(artifact_root) / "images" / "shard-00000.tar").read_bytes()
    assert sorted(members) == ["12.jpg", "13.png", "14.jpg", "19.gif"]
    for photo_id in ok_ids:
        row = manifest[photo_id]
        served = server.routes[cases[photo_id][0].removeprefix(server.base_url)][0].body
        assert members[row["member"]] == served
        assert tar_bytes[row["offset"]:row["offset"] + row["bytes"]] == served
        assert decode_image(served).size == (row["width"], row["height"])
    assert manifest[12]["format"] == "JPEG"
    assert manifest[13]["format"] == "PNG"
    assert manifest[14]["orientation"] == 6
    assert (manifest[14]["width"], manifest[14]["height"]) == (80, 120)
    assert manifest[19]["format"] == "GIF"


def test_download_manifest_schema(server, artifact_root):
    cases = fault_cases(server)
    write_plan(artifact_root, {1: cases[1][0], 2: cases[2][0]})

    download.run(make_config(artifact_root, *FAST_OPTIONS))

    schema = pq.read_schema(Path(artifact_root) / "images" / "shard-00000.parquet")
    assert str(schema.field("http_status").type) == "int32"
    assert str(schema.field("offset").type) == "int64"
    assert str(schema.field("orientation").type) == "int16"
    assert str(schema.field("attempts").type) == "int32"
    assert schema.names == ["photo_id", "url", "status", "error", "http_status", "bytes",
                            "width", "height", "sha256", "member", "offset", "orientation",
                            "format", "attempts"]
    stats = json.loads((Path(artifact_root) / "images" / "shard-00000.stats.json").read_text())
    assert stats["counts"] == {"http_error": 1, "ok": 1}
    assert stats["samples"] == 2


def test_finished_shard_rerun_is_noop(server, artifact_root):
    cases = fault_cases(server)
    write_plan(artifact_root, {1: cases[1][0], 2: cases[2][0]})
    download.run(make_config(artifact_root, *FAST_OPTIONS))
    tar_path = Path(artifact_root) / "images" / "shard-00000.tar"
    modified = tar_path.stat().st_mtime_ns

    summary = download.run(make_config(artifact_root, *FAST_OPTIONS))

    assert summary["skipped"] is True
    assert server.requests["/ok/1_aa.jpg"] == 1
    assert server.requests["/missing/2_aa.jpg"] == 1
    assert tar_path.stat().st_mtime_ns == modified
    assert sorted(p.name for p in tar_path.parent.iterdir()) == [
        "shard-00000.parquet", "shard-00000.stats.json", "shard-00000.tar"]


def test_finished_shard_other_options_rejected(server, artifact_root):
    cases = fault_cases(server)
    write_plan(artifact_root, {1: cases[1][0]})
    download.run(make_config(artifact_root, *FAST_OPTIONS))

    with pytest.raises(StageError, match="min_edge"):
        download.run(make_config(artifact_root, *FAST_OPTIONS, "--min-edge", "32"))


def test_finished_shard_new_mirror_is_noop(artifact_root):
    urls = {6985418911: "http://farm8.staticflickr.com/7205/6985418911_df7747990d.jpg"}
    write_plan(artifact_root, urls)
    options = ("--min-size", "100", "--min-edge", "16")
    with SampleMirror(max_side=64) as mirror:
        first_url = mirror.base_url
        download.run(make_config(artifact_root, "--mirror-base-url", first_url, *options))

    with SampleMirror(max_side=64) as other:
        summary = download.run(make_config(artifact_root, "--mirror-base-url", other.base_url,
                                           *options))

    assert summary["skipped"] is True
    assert read_manifest(artifact_root)[6985418911]["url"].startswith(first_url)


def test_download_through_sample_mirror(artifact_root):
    urls = {6985418911: "http://farm8.staticflickr.com/7205/6985418911_df7747990d.jpg",
            10201275523: "http://farm6.staticflickr.com/5465/10201275523_3e6ea67c7f.jpg"}
    write_plan(artifact_root, urls)

    with SampleMirror(max_side=64) as mirror:
        base_url = mirror.base_url
        download.run(make_config(artifact_root, "--mirror-base-url", base_url + "/",
                                 "--min-size", "100", "--min-edge", "16"))

    manifest = read_manifest(artifact_root)
    row = manifest[6985418911]
    assert row["status"] == "ok"
    assert row["url"] == (f"{base_url}/farm8.staticflickr.com/7205/"
                          "6985418911_df7747990d.jpg")
    assert manifest[10201275523]["status"] == "ok"
    assert manifest[10201275523]["sha256"] != row["sha256"]


def run_download_process(root: str, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks", "download", "--artifact-root", root,
         "--shard", "00000", *options],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def recorded_rows(record: Path) -> list[dict]:
    if not record.exists():
        return []
    rows = []
    for line in record.read_text().splitlines()[1:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def test_killed_download_resumes(server, artifact_root):
    photos = {photo_id: make_jpeg(photo_id, 48) for photo_id in range(100, 116)}
    urls = {photo_id: server.route(f"/slow/{photo_id}_aa.jpg", Reply(body=body))
            for photo_id, body in photos.items()}
    write_plan(artifact_root, urls)
    server.delay = 0.25
    record = Path(artifact_root) / "images" / "shard-00000.jsonl.tmp-download"
    options = [*FAST_OPTIONS, "--concurrency", "2", "--timeout", "5"]

    process = run_download_process(artifact_root, *options)
    deadline = time.monotonic() + 30
    while len(recorded_rows(record)) < 4 and process.poll() is None:
        assert time.monotonic() < deadline, "the download recorded no progress in 30 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()

    images = Path(artifact_root) / "images"
    assert not (images / "shard-00000.tar").exists()
    assert not (images / "shard-00000.parquet").exists()
    assert not (images / "shard-00000.stats.json").exists()
    finished_before_kill = {row["photo_id"] for row in recorded_rows(record)}
    assert 4 <= len(finished_before_kill) < len(photos)

    server.delay = 0.0
    summary = download.run(make_config(artifact_root, *options))

    assert summary["resumed"] == len(finished_before_kill)
    for photo_id in finished_before_kill:
        assert server.requests[f"/slow/{photo_id}_aa.jpg"] == 1, photo_id
    manifest = read_manifest(artifact_root)
    members = read_tar(artifact_root)
    assert sorted(manifest) == sorted(photos)
    assert {row["status"] for row in manifest.values()} == {"ok"}
    assert sorted(members) == sorted(f"{photo_id}.jpg" for photo_id in photos)
    for photo_id, body in photos.items():
        assert members[f"{photo_id}.jpg"] == body
    assert not record.exists()


def test_writer_drops_torn_tail(tmp_path):
    options = {"min_edge": 1}
    row = {"photo_id": 1, "status": "ok", "bytes": 700, "member": "1.jpg"}
    with ShardWriter(tmp_path, "00000", options) as writer:
        writer.add(dict(row), b"a" * 700)
        writer.add({"photo_id": 2, "status": "http_error", "bytes": 0})
        end = writer.tar_path.stat().st_size
    with open(writer.tar_path, "ab") as tar, open(writer.record_path, "a") as record:
        tar.write(b"half of a member")
        record.write('{"photo_id": 3, "sta')

    with ShardWriter(tmp_path, "00000", options) as resumed:
        assert resumed.done_ids == {1, 2}
        assert resumed.tar_path.stat().st_size == end
        resumed.add({"photo_id": 3, "status": "ok", "bytes": 5, "member": "3.jpg"}, b"third")
        tar_path = resumed.finish()
        with tarfile.open(tar_path) as tar:
            assert [m.name for m in tar.getmembers()] == ["1.jpg", "3.jpg"]
            assert tar.extractfile("3.jpg").read() == b"third"


def test_writer_rejects_other_options(tmp_path):
    with ShardWriter(tmp_path, "00000", {"min_edge": 1}) as writer:
        writer.add({"photo_id": 1, "status": "empty", "bytes": 0})

    with pytest.raises(StageError, match="partly downloaded"):
        ShardWriter(tmp_path, "00000", {"min_edge": 2}).__enter__()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--shard", "7", "five-digit"),
    ("--concurrency", "0", "--concurrency must be at least 1"),
    ("--per-host", "0", "--per-host must be at least 1"),
    ("--retries", "-1", "--retries must be at least 0"),
    ("--timeout", "0", "--timeout must be a positive"),
    ("--backoff-base", "-1", "--backoff-base must be zero or more"),
    ("--min-size", "-5", "--min-size must be at least 0"),
    ("--max-aspect-ratio", "0.5", "--max-aspect-ratio must be at least 1"),
    ("--max-pixels", "0", "--max-pixels must be at least 1"),
    ("--mirror-base-url", "ftp://mirror", "http:// or https://"),
    ("--placeholder-sha256", "abc", "64-digit"),
    ("--s3-mirror-uri", "multimedia-commons", "s3://bucket"),
])
def test_download_bad_option(artifact_root, option, value, message):
    with pytest.raises(ConfigError, match=message):
        make_config(artifact_root, option, value)


def test_download_unknown_shard(artifact_root, capsys):
    write_plan(artifact_root, {1: "http://127.0.0.1:9/1_aa.jpg"})

    status = main(["download", "--artifact-root", artifact_root, "--shard", "00042"])

    assert status == 2
    assert "shard 00042 is not in" in capsys.readouterr().err


def test_download_missing_plan(artifact_root, capsys):
    status = main(["download", "--artifact-root", artifact_root, "--shard", "00000"])

    assert status == 2
    assert "missing artifact" in capsys.readouterr().err


def test_download_to_s3_root(server, s3_root, tmp_path):
    cases = fault_cases(server)
    write_plan(s3_root, {1: cases[1][0], 2: cases[2][0], 13: cases[13][0]})
    work_dir = tmp_path / "work"

    summary = download.run(make_config(s3_root, *FAST_OPTIONS, "--work-dir", str(work_dir)))
    rerun = download.run(make_config(s3_root, *FAST_OPTIONS, "--work-dir", str(work_dir)))

    store = ArtifactStore(s3_root)
    manifest = pq.read_table(io.BytesIO(store.read_bytes("images/shard-00000.parquet")))
    rows = {row["photo_id"]: row for row in manifest.to_pylist()}
    tar_bytes = store.read_bytes("images/shard-00000.tar")
    assert summary["ok"] == 2
    assert rerun["skipped"] is True
    assert store.read_json("images/shard-00000.stats.json")["counts"] == {
        "http_error": 1, "ok": 2}
    assert rows[13]["member"] == "13.png"
    served = server.routes["/png/13_aa.jpg"][0].body
    assert tar_bytes[rows[13]["offset"]:rows[13]["offset"] + rows[13]["bytes"]] == served
    assert list(work_dir.iterdir()) == []


def test_download_falls_back_to_s3_mirror(server, s3_server, s3_root, tmp_path):
    cases = fault_cases(server)
    missing, served, nowhere = 0x5EED0001, 0x5EED0002, 0x5EED0003
    write_plan(str(tmp_path / "root"), {missing: cases[2][0], served: cases[1][0],
                                        nowhere: cases[2][0]})
    mirror_uri = f"{s3_root}-mirror"
    prefix = mirror_uri.removeprefix(f"s3://{s3_server.bucket}/")
    photo = make_jpeg(7)
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key=f"{prefix}/data/images/5ee/d00/{missing:x}.jpg",
        Body=photo)

    download.run(make_config(str(tmp_path / "root"), *FAST_OPTIONS,
                             "--source", "http-then-s3-mirror", "--s3-mirror-uri", mirror_uri))

    manifest = read_manifest(str(tmp_path / "root"))
    assert manifest[missing]["status"] == "ok"
    assert manifest[missing]["url"] == f"{mirror_uri}/data/images/5ee/d00/{missing:x}.jpg"
    assert manifest[missing]["attempts"] == 2
    assert read_tar(str(tmp_path / "root"))[f"{missing}.jpg"] == photo
    assert manifest[served]["status"] == "ok"
    assert manifest[served]["url"].startswith(server.base_url)
    assert manifest[nowhere]["status"] == "http_error"
    assert manifest[nowhere]["http_status"] == 404
    assert manifest[nowhere]["url"].startswith("s3://")


def retry_cases(server: FaultyServer) -> dict[int, tuple[str, str, str]]:
    """Route URLs that fail on the first request; return photo id -> (url, first status,
    status after --retry-failed)."""
    cases = {
        31: ("/ok/31_aa.jpg", [Reply(body=make_jpeg(31))], "ok", "ok"),
        32: ("/busy/32_aa.jpg", [Reply(503, b"busy"), Reply(body=make_jpeg(32))],
             "http_error", "ok"),
        33: ("/throttled/33_aa.jpg", [Reply(429, b"slow down"), Reply(body=make_jpeg(33))],
             "http_error", "ok"),
        34: ("/stalled/34_aa.jpg", [Reply(body=make_jpeg(34), delay=2.0),
                                    Reply(body=make_jpeg(34))], "timeout", "ok"),
        35: ("/cut/35_aa.jpg", [Reply(body=make_jpeg(35)[:500], declared_length=2000),
                                Reply(body=make_jpeg(35))], "truncated", "ok"),
        36: ("/missing/36_aa.jpg", [Reply(404, b"gone"), Reply(body=make_jpeg(36))],
             "http_error", "http_error"),
        37: ("/corrupt/37_aa.jpg", [Reply(body=make_jpeg(37)[:600]), Reply(body=make_jpeg(37))],
             "invalid_image", "invalid_image"),
        38: ("/down/38_aa.jpg", [Reply(502, b"bad gateway")], "http_error", "http_error"),
        39: ("/ok/39_aa.jpg", [Reply(body=make_jpeg(39))], "ok", "ok"),
    }
    return {photo_id: (server.route(path, *replies), first, after)
            for photo_id, (path, replies, first, after) in cases.items()}


NO_RETRY_OPTIONS = [*FAST_OPTIONS, "--retries", "0"]


def test_retry_failed_refetches_retryable(server, artifact_root):
    cases = retry_cases(server)
    write_plan(artifact_root, {photo_id: url for photo_id, (url, _, _) in cases.items()})
    download.run(make_config(artifact_root, *NO_RETRY_OPTIONS))
    first = read_manifest(artifact_root)
    tar_path = Path(artifact_root) / "images" / "shard-00000.tar"
    old_tar = tar_path.read_bytes()
    for photo_id, (_, expected, _) in cases.items():
        assert first[photo_id]["status"] == expected, (photo_id, first[photo_id])

    summary = download.run(make_config(artifact_root, *NO_RETRY_OPTIONS, "--retry-failed"))

    manifest = read_manifest(artifact_root)
    members = read_tar(artifact_root)
    new_tar = tar_path.read_bytes()
    assert summary["skipped"] is False
    assert summary["retried"] == 5
    for photo_id, (url, _, expected) in cases.items():
        assert manifest[photo_id]["status"] == expected, (photo_id, manifest[photo_id])
        path = url.removeprefix(server.base_url)
        retried = photo_id in (32, 33, 34, 35, 38)
        assert server.requests[path] == (2 if retried else 1), path
    for photo_id in (31, 32, 33, 34, 35, 39):
        row = manifest[photo_id]
        assert members[row["member"]] == make_jpeg(photo_id)
        assert new_tar[row["offset"]:row["offset"] + row["bytes"]] == make_jpeg(photo_id)
    assert manifest[31]["offset"] == first[31]["offset"]
    assert manifest[39]["offset"] == first[39]["offset"]
    kept_end = len(old_tar) - 2 * tarfile.BLOCKSIZE
    assert new_tar[:kept_end] == old_tar[:kept_end]
    stats = json.loads((Path(artifact_root) / "images" / "shard-00000.stats.json").read_text())
    assert stats["counts"] == {"http_error": 2, "invalid_image": 1, "ok": 6}
    assert stats["retried_failed"] == 5
    assert stats["fetched"] == 5
    assert sorted(p.name for p in tar_path.parent.iterdir()) == [
        "shard-00000.parquet", "shard-00000.stats.json", "shard-00000.tar"]


def test_retry_failed_nothing_retryable_is_noop(server, artifact_root):
    cases = retry_cases(server)
    write_plan(artifact_root, {photo_id: cases[photo_id][0] for photo_id in (31, 36, 37)})
    download.run(make_config(artifact_root, *NO_RETRY_OPTIONS))
    tar_path = Path(artifact_root) / "images" / "shard-00000.tar"
    modified = tar_path.stat().st_mtime_ns

    summary = download.run(make_config(artifact_root, *NO_RETRY_OPTIONS, "--retry-failed"))

    assert summary["skipped"] is True
    assert summary["retried"] == 0
    assert tar_path.stat().st_mtime_ns == modified
    for path in ("/ok/31_aa.jpg", "/missing/36_aa.jpg", "/corrupt/37_aa.jpg"):
        assert server.requests[path] == 1, path


def test_retry_failed_unfinished_shard_downloads(server, artifact_root):
    cases = retry_cases(server)
    write_plan(artifact_root, {photo_id: cases[photo_id][0] for photo_id in (31, 32)})

    summary = download.run(make_config(artifact_root, *NO_RETRY_OPTIONS, "--retry-failed"))

    manifest = read_manifest(artifact_root)
    assert summary["skipped"] is False
    assert summary["retried"] == 0
    assert manifest[31]["status"] == "ok"
    assert manifest[32]["status"] == "http_error"


def test_retry_failed_other_options_rejected(server, artifact_root):
    cases = retry_cases(server)
    write_plan(artifact_root, {32: cases[32][0]})
    download.run(make_config(artifact_root, *NO_RETRY_OPTIONS))

    with pytest.raises(StageError, match="min_edge"):
        download.run(make_config(artifact_root, *NO_RETRY_OPTIONS, "--retry-failed",
                                 "--min-edge", "32"))
    assert server.requests["/busy/32_aa.jpg"] == 1


def test_retry_failed_resumes_interrupted_retry(server, artifact_root):
    cases = retry_cases(server)
    ids = (31, 32, 33)
    write_plan(artifact_root, {photo_id: cases[photo_id][0] for photo_id in ids})
    download.run(make_config(artifact_root, *NO_RETRY_OPTIONS))
    images = Path(artifact_root) / "images"
    config = make_config(artifact_root, *NO_RETRY_OPTIONS, "--retry-failed")
    manifest_digest = hashlib.sha256((images / "shard-00000.parquet").read_bytes()).hexdigest()
    options = {**config.output_options(), "retry_of_manifest_sha256": manifest_digest}
    # A retry that was killed after seeding and recording photo 32, before publishing.
    kept_rows = [read_manifest(artifact_root)[31]]
    with ShardWriter(images, "00000", options, purpose="retry") as writer:
        writer.seed(kept_rows, images / "shard-00000.tar",
                    kept_rows[0]["offset"] + padded_size(kept_rows[0]["bytes"]))
        writer.add({**read_manifest(artifact_root)[32], "status": "ok", "error": None,
                    "member": "32.jpg", "bytes": len(make_jpeg(32))}, make_jpeg(32))

    summary = download.run(config)

    manifest = read_manifest(artifact_root)
    assert summary["retried"] == 2
    assert server.requests["/busy/32_aa.jpg"] == 1
    assert server.requests["/throttled/33_aa.jpg"] == 2
    assert {row["status"] for row in manifest.values()} == {"ok"}
    assert read_tar(artifact_root)["32.jpg"] == make_jpeg(32)
    assert not (images / "shard-00000.jsonl.tmp-retry").exists()


def test_retry_failed_discards_stale_retry(server, artifact_root):
    cases = retry_cases(server)
    write_plan(artifact_root, {photo_id: cases[photo_id][0] for photo_id in (31, 32)})
    download.run(make_config(artifact_root, *NO_RETRY_OPTIONS))
    images = Path(artifact_root) / "images"
    config = make_config(artifact_root, *NO_RETRY_OPTIONS, "--retry-failed")
    stale_options = {**config.output_options(), "retry_of_manifest_sha256": "0" * 64}
    with ShardWriter(images, "00000", stale_options, purpose="retry") as writer:
        writer.add({"photo_id": 32, "status": "timeout", "bytes": 0})

    download.run(config)

    manifest = read_manifest(artifact_root)
    assert manifest[32]["status"] == "ok"
    assert server.requests["/busy/32_aa.jpg"] == 2
    assert read_tar(artifact_root)["31.jpg"] == make_jpeg(31)


def test_rate_limiter_spaces_request_starts():
    import asyncio

    from tasks.download.fetch import RateLimiter

    limiter = RateLimiter(rate=100.0)

    async def five_requests():
        await asyncio.gather(*(limiter.wait() for _ in range(5)))
        return limiter.next_start

    started = time.monotonic()
    next_start = asyncio.run(five_requests())

    # Five starts booked 10 ms apart put the next free slot 50 ms after the first.
    assert next_start - started >= 0.05 - 1e-3


def test_rate_limited_shard_downloads_everything(server, artifact_root):
    cases = fault_cases(server)
    write_plan(artifact_root, {1: cases[1][0], 2: cases[2][0]})

    download.run(make_config(artifact_root, *FAST_OPTIONS, "--max-requests-per-second", "50"))

    assert len(read_manifest(artifact_root)) == 2


@pytest.mark.parametrize("value", ["0.0001x", "-1", "inf", "nan"])
def test_invalid_rate_limit(artifact_root, value):
    with pytest.raises((ConfigError, SystemExit)):
        make_config(artifact_root, "--max-requests-per-second", value)
