"""The artifact root: one URI under which every stage reads and writes.

A root is a local path, a `file://` URI or `s3://bucket/prefix`. Keys are relative,
slash-separated paths such as `images/shard-00000.tar`. Every write is atomic: a
reader sees the old object, the new object or nothing, never a partial one. Locally
that is a temporary file in the same folder followed by `os.replace`; on S3 a single
PUT (or a completed multipart upload) is already atomic.

S3 settings come from the environment as boto3 reads them (`AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...). With no credentials configured, requests are
unsigned, which is what public buckets such as `multimedia-commons` need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tasks.errors import StageError

logger = logging.getLogger(__name__)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/some/key` into `("bucket", "some/key")`."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StageError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


def make_s3_client():
    """Create a boto3 S3 client; unsigned when no credentials are configured."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(retries={"max_attempts": 5, "mode": "standard"})
    if session.get_credentials() is None:
        logger.info("no AWS credentials configured, using unsigned S3 requests")
        config = config.merge(Config(signature_version=UNSIGNED))
    return session.client("s3", config=config)


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path_from_uri(uri: str) -> Path:
    """Turn a local path or `file://` URI into a Path."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if "://" in uri:
        raise StageError(
            f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://"
        )
    return Path(uri).expanduser()


def _atomic_local_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class ArtifactStore:
    """Read and write keys under one artifact root URI, locally or on S3."""

    def __init__(self, root: str):
        if not root.strip():
            raise StageError("the artifact root is empty; pass --artifact-root with a folder, "
                             "file:// or s3://bucket/prefix")
        self.root = root.rstrip("/") if root not in ("/", "file:///") else root
        self._client = None
        if is_s3_uri(root):
            self.bucket, prefix = split_s3_uri(root)
            self.prefix = prefix.strip("/")
            self.path = None
        else:
            self.bucket = None
            self.prefix = ""
            self.path = local_path_from_uri(root).resolve()

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def client(self):
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def url(self, key: str) -> str:
        """Full URI of a key, for logs and messages."""
        if self.is_s3:
            return f"s3://{self.bucket}/{self._s3_key(key)}"
        return str(self.path / key)

    def _s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _local(self, key: str) -> Path:
        return self.path / key

    def ensure_writable(self) -> None:
        """Write and delete a probe object, failing clearly when the root cannot be written."""
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(probe, b"")
            self.delete(probe)
        except (OSError, StageError) as error:
            raise StageError(
                f"artifact root {self.root!r} is not writable ({error}); pass a writable "
                "folder or s3:// prefix with --artifact-root"
            ) from error
        except Exception as error:  # botocore raises ClientError and friends
            if type(error).__module__.startswith("botocore"):
                raise StageError(
                    f"artifact root {self.root!r} is not writable ({error}); check the "
                    "bucket name, endpoint and credentials"
                ) from error
            raise

    def exists(self, key: str) -> bool:
        if not self.is_s3:
            return self._local(key).exists()
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, key: str) -> bytes:
        if not self.is_s3:
            try:
                return self._local(key).read_bytes()
            except FileNotFoundError as error:
                raise StageError(f"missing artifact {self.url(key)}: run the stage that "
                                 "writes it first") from error
            except IsADirectoryError as error:
                raise StageError(f"{self.url(key)} is a folder where a file was expected; "
                                 "remove it and re-run the stage that writes it") from error
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise StageError(f"missing artifact {self.url(key)}: run the stage that "
                                 "writes it first") from error
            raise
        return response["Body"].read()

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StageError(f"{self.url(key)} is not valid JSON ({error}); it may be "
                             "truncated: delete it and re-run the stage that writes it") from error

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_bytes(self, key: str, data: bytes) -> None:
        if not self.is_s3:
            _atomic_local_write(self._local(key), lambda handle: handle.write(data))
            return
        self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key), Body=data)

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def write_json(self, key: str, value: Any) -> None:
        self.write_text(key, json.dumps(value, indent=2, sort_keys=True) + "\n")

    def put_file(self, local: Path, key: str) -> None:
        """Publish a finished local file under `key` atomically."""
        if not self.is_s3:
            target = self._local(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return
        self.client.upload_file(str(local), self.bucket, self._s3_key(key))

    def get_file(self, key: str, local: Path) -> None:
        """Copy `key` to a local file."""
        local.parent.mkdir(parents=True, exist_ok=True)
        if not self.is_s3:
            shutil.copyfile(self._local(key), local)
            return
        self.client.download_file(self.bucket, self._s3_key(key), str(local))

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """Yield a local path holding `key`: the file itself locally, a temporary copy for S3."""
        if not self.is_s3:
            path = self._local(key)
            if not path.exists():
                raise StageError(f"missing artifact {self.url(key)}: run the stage that "
                                 "writes it first")
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="clear-") as tmp:
            path = Path(tmp) / Path(key).name
            if not self.exists(key):
                raise StageError(f"missing artifact {self.url(key)}: run the stage that "
                                 "writes it first")
            self.get_file(key, path)
            yield path

    @contextlib.contextmanager
    def staged_file(self, key: str, suffix: str = "") -> Iterator[Path]:
        """Yield a temporary local path; when the block succeeds, publish it as `key`.

        If the block raises, nothing is published and the temporary file is removed.
        """
        with tempfile.TemporaryDirectory(prefix="clear-") as tmp:
            path = Path(tmp) / (Path(key).name + suffix)
            yield path
            self.put_file(path, key)

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted, without temporary files."""
        if not self.is_s3:
            base = self._local(prefix)
            if base.is_file():
                return [prefix]
            if not base.exists():
                return []
            keys = []
            for path in base.rglob("*"):
                if path.is_file() and ".tmp-" not in path.name:
                    keys.append(path.relative_to(self.path).as_posix())
            return sorted(keys)
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._s3_key(prefix)):
            for item in page.get("Contents", []):
                key = item["Key"]
                keys.append(key[len(self.prefix) + 1:] if self.prefix else key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        if not self.is_s3:
            self._local(key).unlink(missing_ok=True)
            return
        self.client.delete_object(Bucket=self.bucket, Key=self._s3_key(key))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    @contextlib.contextmanager
    def exclusive(self, key: str) -> Iterator[None]:
        """Hold an exclusive lock named `key` for the block, or fail if another process has it.

        NOTE: only local roots are locked (flock on `<root>/<key>`); S3 has no lock, so two
        runs of one stage on the same S3 prefix must be avoided by the scheduler.
        """
        if self.is_s3:
            yield
            return
        import fcntl

        path = self._local(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise StageError(f"{self.url(key)} is locked by another process running the "
                                 "same stage; wait for it to finish") from error
            yield


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[Path]:
    """Yield a local path for an input file given as a path, `file://` or `s3://` URI.

    Missing or unreadable inputs raise a StageError that names the URI.
    """
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        from botocore.exceptions import BotoCoreError, ClientError

        with tempfile.TemporaryDirectory(prefix="clear-input-") as tmp:
            path = Path(tmp) / Path(key).name
            try:
                make_s3_client().download_file(bucket, key, str(path))
            except (ClientError, BotoCoreError) as error:
                raise StageError(f"cannot read input {uri!r} ({error}); check the bucket, "
                                 "key, endpoint and credentials") from error
            yield path
        return
    path = local_path_from_uri(uri)
    if path.is_dir():
        raise StageError(f"input {uri!r} is a folder; pass the path of a file")
    if not path.is_file():
        raise StageError(f"input file {uri!r} not found; pass an existing path or s3:// URI")
    if not os.access(path, os.R_OK):
        raise StageError(f"input file {uri!r} is not readable; check its permissions")
    yield path
