"""Streaming conversion of yfcc100m_dataset files, joined with their side files by line order.

The dataset files are read one after another as one sequence of lines. The side files
are `yfcc100m_lines` (line, id), `yfcc100m_hash` (id, hash) and `yfcc100m_autotags`
(id, `concept:score,...`). Each contains one line per dataset line in the same order,
so line k of every side file belongs to line k of the concatenated dataset files.
Each joined line must carry the same photo id in every file, otherwise the
conversion stops.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import StageError, one_line_reason
from tasks.metadata_convert import (
    AUTOTAGS_TEXT,
    DATASET_COLUMNS,
    OLD_DATASET_COLUMNS,
    Rejects,
    convert_batch,
)
from tasks.metadata_transfer import open_decompressed

logger = logging.getLogger(__name__)

# Side-file roles: (column of the photo id, column of the value, output column).
SIDE_FILES = {"lines": (1, 0, "line_number"), "hash": (0, 1, "hash"),
              "autotags": (0, 1, AUTOTAGS_TEXT)}


@dataclass(frozen=True)
class Input:
    """One input file: its URI for messages and its local path."""
    uri: str
    path: Path


def _read_error(uri: str, lines: int, error: Exception) -> StageError:
    return StageError(f"cannot read {uri!r} after {lines} lines: {ascii(one_line_reason(error))}; "
                      "check that the file is complete and that its name ends in .bz2 or .gz "
                      "only when it is compressed")


class SideFile:
    """Streams one side file and hands out its lines in dataset line order."""

    def __init__(self, role: str, source: Input, decoder: str, block_bytes: int,
                 stack: contextlib.ExitStack):
        import pyarrow as pa
        import pyarrow.csv as csv

        self.role, self.uri = role, source.uri
        self.id_index, self.value_index, self.column = SIDE_FILES[role]
        self.consumed = 0  # lines handed out or skipped so far
        self._buffered = pa.chunked_array([], pa.string())
        stream = stack.enter_context(open_decompressed(source.path, decoder))
        # One column per line, split at the first tab later. A line that contains the
        # unit separator '\x1f' has two columns, so the read fails with its line number.
        try:
            self._reader = csv.open_csv(
                stream, read_options=csv.ReadOptions(column_names=["text"], use_threads=False,
                                                     block_size=block_bytes),
                parse_options=csv.ParseOptions(delimiter="\x1f", quote_char=False,
                                               escape_char=False, ignore_empty_lines=False),
                convert_options=csv.ConvertOptions(column_types={"text": pa.string()},
                                                   strings_can_be_null=False))
        except (pa.ArrowInvalid, OSError, RuntimeError) as error:
            raise _read_error(self.uri, 0, error) from error

    def _fill(self, count: int) -> bool:
        import pyarrow as pa

        while len(self._buffered) < count:
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                return False
            except (pa.ArrowInvalid, OSError, RuntimeError) as error:
                raise _read_error(self.uri, self.consumed + len(self._buffered), error) from error
            self._buffered = pa.chunked_array(self._buffered.chunks + [batch.column(0)])
        return True

    def take(self, count: int):
        """Return the next `count` lines split into (photo ids, values) string arrays."""
        import pyarrow.compute as pc

        if not self._fill(count):
            raise StageError(
                f"{self.role} file {self.uri!r} ends after {self.consumed + len(self._buffered)} "
                f"lines, but the dataset files have at least {self.consumed + count}; pass the "
                f"{self.role} file of the same YFCC100M release")
        text = self._buffered.slice(0, count).combine_chunks()
        self._buffered = self._buffered.slice(count)
        self.consumed += count
        fields = pc.extract_regex(text, r"^(?P<first>[^\t]*)(?:\t(?P<second>.*))?$")
        names = ["first", "second"]
        return fields.field(names[self.id_index]), fields.field(names[self.value_index])

    def finish(self, dataset_lines: int) -> None:
        """Fail when the side file has more lines than the dataset files."""
        if self._fill(1):
            raise StageError(f"{self.role} file {self.uri!r} has more lines than the "
                             f"{dataset_lines} lines of the dataset files; pass the {self.role} "
                             "file of the same YFCC100M release")


class LineMap:
    """Maps parsed row indices of one dataset file to 1-based physical line numbers.

    The CSV reader drops lines with a wrong column count before the typed checks see
    the block, so a row's physical line is its index among the parsed rows plus the
    number of dropped lines before it.
    """

    def __init__(self) -> None:
        self.dropped: list[int] = []

    def physical_lines(self, first_index: int, count: int):
        import numpy as np

        indices = np.arange(first_index, first_index + count, dtype=np.int64)
        dropped = np.sort(np.asarray(self.dropped, np.int64))
        # Parsed rows before the k-th dropped line: dropped[k] - 1 - k.
        rows_before = dropped - 1 - np.arange(len(dropped))
        return indices + 1 + np.searchsorted(rows_before, indices, side="right")


def _join_side_files(batch, lines, lines_before: int, sides: list[SideFile], uri: str):
    """Append the side-file columns of this block, checking that photo ids match."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for side in sides:
        # Side lines of dropped dataset lines are read and skipped with the block.
        start = side.consumed
        ids, values = side.take(lines_before + int(lines[-1]) - start)
        indices = pa.array(lines - 1 + lines_before - start)
        ids, values = ids.take(indices), values.take(indices)
        equal = pc.fill_null(pc.equal(batch.column("photo_id"), ids.cast(pa.binary())), False)
        if not pc.all(equal).as_py():
            index = pc.index(equal, False).as_py()
            raise StageError(
                f"photo id mismatch: line {lines[index]} of {uri!r} has id "
                f"{batch.column('photo_id')[index].as_py().decode('utf-8', 'replace')!r}, but "
                f"line {lines_before + int(lines[index])} of the {side.role} file "
                f"{side.uri!r} has id {ids[index].as_py()!r}; the files are not in the same "
                "line order, so pass files of the same YFCC100M release")
        batch = batch.append_column(side.column, values.cast(pa.binary()))
    return batch


def _open_dataset(source: Input, columns: list[str], block_bytes: int, decoder: str,
                  line_map: LineMap, rejects: Rejects, stack: contextlib.ExitStack):
    import pyarrow as pa
    import pyarrow.csv as csv

    def handle_invalid_row(row) -> str:
        line_map.dropped.append(row.number)
        rejects.add(source.uri, row.number, f"expected {row.expected_columns} columns, found "
                    f"{row.actual_columns}", row.text)
        return "skip"

    read_options = csv.ReadOptions(column_names=columns, block_size=block_bytes,
                                   use_threads=False)  # so invalid rows carry line numbers
    parse_options = csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                     newlines_in_values=False, ignore_empty_lines=False,
                                     invalid_row_handler=handle_invalid_row)
    convert_options = csv.ConvertOptions(
        # Binary, so that one line with invalid UTF-8 becomes a reject instead of failing
        # the whole block.
        column_types={name: pa.binary() for name in columns},
        strings_can_be_null=False, quoted_strings_can_be_null=False,
    )
    stream = stack.enter_context(open_decompressed(source.path, decoder))
    try:
        return csv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                            convert_options=convert_options)
    except (pa.ArrowInvalid, OSError, RuntimeError) as error:
        raise StageError(f"cannot parse {source.uri!r} as tab-separated yfcc100m_dataset "
                         f"({ascii(str(error)[:200])}); pass a non-empty yfcc100m_dataset "
                         "file, plain, .bz2 or .gz") from error


class PartWriter:
    """Writes typed tables into Parquet parts of at most `part_rows` rows each."""

    def __init__(self, store, version: str, part_rows: int, folder: Path):
        self.store, self.version, self.part_rows, self.folder = store, version, part_rows, folder
        self.parts: list[dict] = []
        self.rows = 0
        self._writer = None
        self._staged = None
        self._part_rows = 0

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._staged = self.folder / f"part-{len(self.parts):05d}.parquet"
                self._writer = pq.ParquetWriter(self._staged, table.schema, compression="zstd")
            take = min(self.part_rows - self._part_rows, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, take))
            self._part_rows += take
            self.rows += take
            offset += take
            if self._part_rows >= self.part_rows:
                self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        key = f"metadata/{self.version}/part-{len(self.parts):05d}.parquet"
        self.store.put_file(self._staged, key)
        self.parts.append({"key": key, "rows": self._part_rows})
        self._staged.unlink()
        self._writer, self._staged, self._part_rows = None, None, 0


def convert(datasets: list[Input], sides: dict[str, Input], old_layout: bool, store,
            version: str, config) -> dict:
    """Stream the dataset files, joined with `sides`, into Parquet parts under
    `metadata/<version>/`; return counts, parts and the rejects key."""
    import pyarrow as pa

    columns = OLD_DATASET_COLUMNS if old_layout else DATASET_COLUMNS
    with tempfile.TemporaryDirectory(prefix="clear-metadata-") as tmp, \
            contextlib.ExitStack() as stack:
        rejects = Rejects(Path(tmp) / "rejects.jsonl")
        writer = PartWriter(store, version, config.part_rows, Path(tmp))
        side_files = [SideFile(role, source, config.decoder, config.block_bytes, stack)
                      for role, source in sides.items()]
        # One Parquet write runs in a thread while the next block is parsed and typed.
        # Waiting for it before submitting the next keeps at most two blocks in memory.
        write_thread = stack.enter_context(ThreadPoolExecutor(1, "parquet-writer"))
        pending_write = None
        lines_before = 0
        for source in datasets:
            line_map = LineMap()
            with contextlib.ExitStack() as file_stack:
                reader = _open_dataset(source, columns, config.block_bytes, config.decoder,
                                       line_map, rejects, file_stack)
                parsed = 0
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        break
                    except (pa.ArrowInvalid, OSError, RuntimeError) as error:
                        raise _read_error(source.uri, parsed, error) from error
                    lines = line_map.physical_lines(parsed, batch.num_rows)
                    parsed += batch.num_rows
                    if batch.num_rows == 0:
                        continue
                    batch = _join_side_files(batch, lines, lines_before, side_files, source.uri)
                    table = convert_batch(batch, lines, rejects, source.uri)
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = write_thread.submit(writer.write, table)
            file_lines = parsed + len(line_map.dropped)
            lines_before += file_lines
            for side in side_files:  # skip the side lines of trailing dropped lines
                side.take(lines_before - side.consumed)
        if pending_write is not None:
            pending_write.result()
        for side in side_files:
            side.finish(lines_before)
        writer.close()
        rejects.close()
        rejects_key = f"metadata/{version}/rejects.jsonl"
        store.put_file(rejects.path, rejects_key)
    return {"rows": writer.rows, "rejected": rejects.count, "lines": lines_before,
            "parts": writer.parts, "rejects": rejects_key}
