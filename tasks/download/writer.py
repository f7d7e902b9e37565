"""The resumable working copy of one shard: a growing tar and a progress record.

While a shard downloads, two working files sit in the work folder under names that
contain `.tmp-`, which `ArtifactStore.list` skips:

- `shard-NNNNN.tar.tmp-download`: tar members appended one by one, without the
  end-of-archive blocks;
- `shard-NNNNN.jsonl.tmp-download`: a header line with the output options, then one
  JSON line per finished sample (a manifest row).

A sample's tar member is written and flushed before its row, so every row of an `ok`
sample points at complete data. On resume the record is read back, a torn last line is
dropped, and the tar is cut back to the end of the last recorded member, discarding a
member that was being written when the process died. A lock file stops two processes
from working on the same shard at once.

A `--retry-failed` run of a finished shard uses its own working files, named with
`.tmp-retry` instead of `.tmp-download`, which it seeds with the published tar's
members and the rows it keeps (see `ShardWriter.seed`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tarfile
from pathlib import Path

from tasks.errors import StageError

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
BLOCK = tarfile.BLOCKSIZE
MANIFEST_COLUMNS = ["photo_id", "url", "status", "error", "http_status", "bytes", "width",
                    "height", "sha256", "member", "offset", "orientation", "format",
                    "attempts"]


def manifest_schema():
    import pyarrow as pa

    return pa.schema([
        ("photo_id", pa.int64()), ("url", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("http_status", pa.int32()), ("bytes", pa.int64()),
        ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
        ("member", pa.string()), ("offset", pa.int64()), ("orientation", pa.int16()),
        ("format", pa.string()), ("attempts", pa.int32()),
    ])


def write_manifest(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: [row.get(name) for row in rows] for name in MANIFEST_COLUMNS}
    table = pa.Table.from_pydict(columns, schema=manifest_schema())
    pq.write_table(table, path)


def padded_size(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar, padded to whole blocks."""
    return -(-size // BLOCK) * BLOCK


class ShardWriter:
    """Appends samples to the working tar and record of one shard, resuming old ones."""

    def __init__(self, work_dir: Path, shard_id: str, options: dict, purpose: str = "download",
                 restart_on_other_options: bool = False):
        """Name the working files after `purpose` ("download" or "retry").

        With `restart_on_other_options`, a progress record written with other options is
        discarded instead of raising StageError.
        """
        self.work_dir = work_dir
        self.shard_id = shard_id
        self.options = options
        self.restart_on_other_options = restart_on_other_options
        self.tar_path = work_dir / f"shard-{shard_id}.tar.tmp-{purpose}"
        self.record_path = work_dir / f"shard-{shard_id}.jsonl.tmp-{purpose}"
        # One lock for every purpose, so a download and a retry of a shard exclude each other.
        self.lock_path = work_dir / f"shard-{shard_id}.lock.tmp-download"
        self.rows: list[dict] = []
        self.resumed = 0
        self._lock = None
        self._tar = None
        self._record = None

    def __enter__(self) -> ShardWriter:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        self.rows = self._load_record()
        self.resumed = len(self.rows)
        tar_end = self._committed_tar_end()
        self._rewrite_record()

        self._tar = open(self.tar_path, "r+b" if self.tar_path.exists() else "w+b")  # noqa: SIM115
        self._tar.truncate(tar_end)
        self._tar.seek(tar_end)
        self._record = open(self.record_path, "a", encoding="utf-8")  # noqa: SIM115
        if self.resumed:
            logger.info("shard %s: resuming with %d samples already recorded",
                        self.shard_id, self.resumed)
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in (self._tar, self._record):
            if handle is not None:
                handle.close()
        self._tar = self._record = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def done_ids(self) -> set[int]:
        return {row["photo_id"] for row in self.rows}

    def add(self, row: dict, data: bytes | None = None) -> None:
        """Record one finished sample; `data` goes into the tar when the row is ok."""
        if data is not None:
            member = row["member"]
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            header = info.tobuf(format=tarfile.USTAR_FORMAT)
            start = self._tar.tell()
            self._tar.write(header)
            self._tar.write(data)
            self._tar.write(b"\0" * (padded_size(len(data)) - len(data)))
            self._tar.flush()
            row["offset"] = start + len(header)
        self._record.write(json.dumps(row, sort_keys=True) + "\n")
        self._record.flush()
        self.rows.append(row)

    def seed(self, rows: list[dict], tar_path: Path, tar_end: int) -> None:
        """Start an empty working copy from a published shard.

        Copies the first `tar_end` bytes of the published tar (its members, without the
        end-of-archive blocks), so `rows` keep their offsets, then records `rows` in one
        atomic replace of the progress record. A run killed before that replace leaves no
        rows, and the next run seeds again. Seeded rows count as resumed.
        """
        if self.rows:
            raise StageError(f"shard {self.shard_id}: cannot seed a working copy that already "
                             f"records {len(self.rows)} samples")
        size = tar_path.stat().st_size
        if size < tar_end:
            raise StageError(f"{tar_path} has {size} bytes, but its manifest places members up "
                             f"to byte {tar_end}; download the shard again")
        self._tar.seek(0)
        self._tar.truncate(0)
        with open(tar_path, "rb") as source:
            remaining = tar_end
            while remaining:
                chunk = source.read(min(remaining, 1 << 20))
                if not chunk:
                    raise StageError(f"{tar_path} ended early while being copied")
                self._tar.write(chunk)
                remaining -= len(chunk)
        self._tar.flush()
        os.fsync(self._tar.fileno())

        self.rows = [dict(row) for row in rows]
        self.resumed += len(self.rows)
        self._record.close()
        self._rewrite_record()
        self._record = open(self.record_path, "a", encoding="utf-8")  # noqa: SIM115

    def finish(self) -> Path:
        """Close the tar with its end-of-archive blocks and return its path."""
        os.fsync(self._tar.fileno())
        end = self._tar.tell()
        self._tar.write(b"\0" * (2 * BLOCK))
        self._tar.flush()
        os.fsync(self._tar.fileno())
        # The end blocks are cut off again if this working copy is ever resumed.
        self._tar.seek(end)
        return self.tar_path

    def discard(self) -> None:
        """Delete the working files once the shard is published; the lock stays held."""
        self.tar_path.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        self._lock = open(self.lock_path, "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self._lock.close()
            self._lock = None
            raise StageError(
                f"shard {self.shard_id} is being downloaded by another process "
                f"(lock {self.lock_path} is held); wait for it to finish"
            ) from error

    def _load_record(self) -> list[dict]:
        if not self.record_path.exists():
            return []
        lines = self.record_path.read_text(encoding="utf-8").splitlines()
        if not lines:
            return []
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            logger.warning("shard %s: unreadable progress record header, starting over",
                           self.shard_id)
            return []
        if header.get("format") != RECORD_FORMAT:
            logger.warning("shard %s: progress record has format %r, expected %d; starting "
                           "over", self.shard_id, header.get("format"), RECORD_FORMAT)
            return []
        if header.get("options") != self.options and self.restart_on_other_options:
            logger.warning("shard %s: progress record %s was written with other options; "
                           "starting over", self.shard_id, self.record_path)
            return []
        if header.get("options") != self.options:
            raise StageError(
                f"shard {self.shard_id} was partly downloaded with options "
                f"{header.get('options')}, which differ from {self.options}; rerun with the "
                f"same options, or delete {self.record_path} and {self.tar_path} to start over"
            )
        rows = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("shard %s: dropping torn line %d of the progress record",
                               self.shard_id, number)
                break
        return rows

    def _committed_tar_end(self) -> int:
        """Drop rows whose member lies beyond the tar's end; return the end of the last one."""
        size = self.tar_path.stat().st_size if self.tar_path.exists() else 0
        complete_rows = []
        end = 0
        for row in self.rows:
            if row["status"] == "ok":
                member_end = row["offset"] + padded_size(row["bytes"])
                if member_end > size:
                    logger.warning("shard %s: sample %s has no complete tar member, "
                                   "fetching it again", self.shard_id, row["photo_id"])
                    continue
                end = max(end, member_end)
            complete_rows.append(row)
        self.rows = complete_rows
        return end

    def _rewrite_record(self) -> None:
        header = {"format": RECORD_FORMAT, "shard": self.shard_id, "options": self.options}
        lines = [json.dumps(header, sort_keys=True)]
        lines += [json.dumps(row, sort_keys=True) for row in self.rows]
        tmp = self.record_path.with_name(self.record_path.name + ".new")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.record_path)
