"""Local copies of sync-metadata inputs: resumable S3 downloads and decompressing readers.

An S3 source is fetched with ranged GETs into `<cache>/<uri digest>/<name>.part`, so an
interrupted download continues from the bytes already on disk. Every range is
conditional on the ETag seen by HEAD, so a source replaced during the download fails
instead of mixing two versions. The finished file is checked against the published
size, and against the ETag when that is the MD5 of the content (single-part uploads);
a multipart ETag is not an MD5 of the content, so only the size is checked then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import StageError, one_line_reason
from tasks.storage import make_s3_client, split_s3_uri

logger = logging.getLogger(__name__)

DEFAULT_RANGE_BYTES = 64 << 20
# Consecutive failed attempts at one range before the download stops (resumable later).
RANGE_ATTEMPTS = 4
# rapidgzip decodes chunks of about 4 MiB in parallel, so smaller files gain nothing.
PARALLEL_MIN_BYTES = 8 << 20
# The CSV parser keeps one core busy, so parallel decoding needs several more.
# NOTE: on 2 shared cores (benchmarks/metadata.py) rapidgzip made the whole conversion
# slower; the 4-core threshold is an estimate, not a measurement.
PARALLEL_MIN_CORES = 4
DECODERS = ("auto", "rapidgzip", "pyarrow")
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")


def default_cache_dir() -> Path:
    """`$CLEAR_CACHE_DIR`, else `$XDG_CACHE_HOME/clear-pipeline`, else `~/.cache/clear-pipeline`."""
    if os.environ.get("CLEAR_CACHE_DIR"):
        return Path(os.environ["CLEAR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clear-pipeline"


def head_s3_object(uri: str, client=None) -> dict:
    """Return the size and ETag that S3 publishes for `uri`."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    client = client or make_s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as error:
        raise StageError(f"cannot read input {uri!r} ({one_line_reason(error)}); check the "
                         "bucket, key, endpoint and credentials") from error
    return {"uri": uri, "bytes": head["ContentLength"], "etag": head["ETag"].strip('"')}


def cache_paths(uri: str, cache_dir: Path) -> tuple[Path, Path, Path]:
    """Return the finished file, the `.part` file and the state file that caches `uri`."""
    folder = cache_dir / "sources" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    final = folder / (Path(split_s3_uri(uri)[1]).name or "object")
    return final, final.with_name(final.name + ".part"), final.with_name(final.name + ".json")


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_range(client, bucket: str, key: str, etag: str, offset: int, end: int, out) -> int:
    """Append bytes `offset..end` (inclusive) to `out`; return the new offset."""
    response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}",
                                 IfMatch=f'"{etag}"')
    for chunk in response["Body"].iter_chunks(1 << 20):
        out.write(chunk)
        offset += len(chunk)
    out.flush()
    return offset


def fetch_s3_object(uri: str, expected: dict, cache_dir: Path, client=None,
                    range_bytes: int = DEFAULT_RANGE_BYTES) -> tuple[Path, dict]:
    """Download `uri` into the cache, resuming a `.part` file left by an earlier attempt.

    `expected` is the result of `head_s3_object`. Returns the local path and a check
    report: `{"etag_check": "md5"}` or `{"etag_check": "multipart ETag, size only"}`.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    client = client or make_s3_client()
    size, etag = expected["bytes"], expected["etag"]
    final, part, state_path = cache_paths(uri, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    state = {"uri": uri, "bytes": size, "etag": etag}
    previous = json.loads(state_path.read_text()) if state_path.exists() else None
    if previous != state:
        final.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        state_path.write_text(json.dumps(state))
    if final.exists() and final.stat().st_size == size:
        logger.info("using the cached download of %s at %s", uri, final)
        return final, {"etag_check": previous.get("etag_check", "cached")}

    offset = part.stat().st_size if part.exists() else 0
    if offset > size:
        part.unlink()
        offset = 0
    if offset:
        logger.info("resuming the download of %s at byte %d of %d", uri, offset, size)
    failures = 0
    with open(part, "ab") as out:
        while offset < size:
            end = min(offset + range_bytes, size) - 1
            try:
                offset = _fetch_range(client, bucket, key, etag, offset, end, out)
                failures = 0
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412"):
                    raise StageError(f"{uri!r} changed during the download (ETag is no longer "
                                     f"{etag}); re-run to fetch the new version") from error
                raise StageError(f"cannot download {uri!r} ({one_line_reason(error)}); "
                                 "re-run to resume from byte " f"{out.tell()}") from error
            except BotoCoreError as error:
                offset = out.tell()
                failures += 1
                logger.warning("range at byte %d of %s failed (attempt %d of %d): %s", offset,
                               uri, failures, RANGE_ATTEMPTS, one_line_reason(error))
                if failures >= RANGE_ATTEMPTS:
                    raise StageError(f"cannot download {uri!r} after {RANGE_ATTEMPTS} attempts "
                                     f"({one_line_reason(error)}); re-run to resume from byte "
                                     f"{offset}") from error

    return final, _verify(uri, part, final, state_path, state)


def _verify(uri: str, part: Path, final: Path, state_path: Path, state: dict) -> dict:
    """Check the finished `.part` file against size and ETag, then rename it to `final`."""
    actual = part.stat().st_size
    if actual != state["bytes"]:
        part.unlink()
        raise StageError(f"download of {uri!r} has {actual} bytes, S3 published "
                         f"{state['bytes']}; re-run to download it again")
    if _MD5_ETAG.fullmatch(state["etag"]):
        digest = _file_md5(part)
        if digest != state["etag"]:
            part.unlink()
            raise StageError(f"download of {uri!r} has MD5 {digest}, but its ETag is "
                             f"{state['etag']}; the cached part was corrupt and is deleted, "
                             "re-run to download it again")
        check = "md5"
    else:
        logger.info("%s has the multipart ETag %s, which is not an MD5 of the content; "
                    "checked the size only", uri, state["etag"])
        check = "multipart ETag, size only"
    os.replace(part, final)
    state_path.write_text(json.dumps({**state, "etag_check": check}))
    return {"etag_check": check}


def remove_cached(uri: str, cache_dir: Path) -> None:
    """Delete the cached download of `uri` once it has been converted."""
    paths = cache_paths(uri, cache_dir)
    for path in paths:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # a folder that is not empty stays
        paths[0].parent.rmdir()


def _use_rapidgzip(path: Path, decoder: str) -> bool:
    # Only bzip2: rapidgzip 0.16.2 returned a truncated gzip file's readable prefix
    # without an error, where pyarrow's zlib reader reports the truncation.
    if decoder == "pyarrow" or path.suffix != ".bz2":
        return False
    if decoder == "auto" and (path.stat().st_size < PARALLEL_MIN_BYTES
                              or len(os.sched_getaffinity(0)) < PARALLEL_MIN_CORES):
        return False
    try:
        import rapidgzip  # noqa: F401
    except ImportError:
        if decoder == "rapidgzip":
            raise StageError("--decoder rapidgzip needs the rapidgzip package; install it "
                             "or pass --decoder auto") from None
        return False
    return True


@contextlib.contextmanager
def open_decompressed(path: Path, decoder: str = "auto") -> Iterator:
    """Yield a readable binary stream of `path`, decompressed by its .bz2 or .gz suffix.

    With decoder "auto", .bz2 files of at least 8 MiB on a machine with at least 4
    available cores are decoded by rapidgzip on every core; everything else goes
    through pyarrow's single-threaded codecs.
    """
    import pyarrow as pa

    if _use_rapidgzip(path, decoder):
        import rapidgzip

        threads = len(os.sched_getaffinity(0))
        # rapidgzip aborts the interpreter when an open file is left to the finalizer.
        with rapidgzip.IndexedBzip2File(str(path), parallelization=threads) as handle:
            yield handle
        return
    with pa.input_stream(str(path), compression="detect") as stream:
        yield stream
