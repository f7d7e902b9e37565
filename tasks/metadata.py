"""sync-metadata: convert a YFCC100M `yfcc100m_dataset` file into typed Parquet parts.

Reads the 25-column layout (line number, photo id, hash, ..., marker) from a local
path or s3:// URI, plain or compressed (.bz2, .gz, detected from the name), streams it
in blocks, and writes `metadata/<version>/part-NNNNN.parquet` plus
`metadata/manifest.json`. The manifest is written last and is the commit marker:
readers list parts only through it, so a re-conversion never exposes a mix of old
and new parts. Malformed lines go to `metadata/<version>/rejects.jsonl` with their
line number and reason; the stage fails when their fraction exceeds
`--max-reject-fraction`. Re-running against an unchanged source does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ConfigError, StageError
from tasks.storage import ArtifactStore, open_input

logger = logging.getLogger(__name__)

MANIFEST_KEY = "metadata/manifest.json"
MANIFEST_FORMAT = 1

# Column names of the 25-column `yfcc100m_dataset` layout, in file order.
DATASET_COLUMNS = [
    "line_number", "photo_id", "hash", "user_nsid", "user_nickname", "date_taken_text",
    "date_uploaded_text", "device", "title", "description", "user_tags", "machine_tags",
    "longitude", "latitude", "accuracy", "page_url", "download_url", "license_name",
    "license_url", "server_id", "farm_id", "secret", "secret_original", "extension",
    "marker",
]
URL_ENCODED_COLUMNS = ["user_nickname", "device", "title", "description"]
TAG_COLUMNS = ["user_tags", "machine_tags"]
PLAIN_TEXT_COLUMNS = ["hash", "user_nsid", "page_url", "download_url", "license_name",
                      "license_url", "secret", "secret_original", "extension"]
# Uploads outside this range cannot be YFCC100M photos (Flickr opened in 2004).
MIN_UPLOAD_SECONDS = 946_684_800     # 2000-01-01
MAX_UPLOAD_SECONDS = 4_102_444_800   # 2100-01-01


@dataclass(frozen=True)
class Config:
    artifact_root: str
    source: str
    part_rows: int = 1_000_000
    block_bytes: int = 16 << 20
    max_reject_fraction: float = 0.01

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if args.part_rows < 1:
            raise ConfigError(f"--part-rows must be at least 1, got {args.part_rows}")
        if args.block_mib < 1:
            raise ConfigError(f"--block-mib must be at least 1, got {args.block_mib}")
        if not 0.0 <= args.max_reject_fraction <= 1.0:
            raise ConfigError(
                f"--max-reject-fraction must be between 0 and 1, got {args.max_reject_fraction}"
            )
        return cls(args.artifact_root, args.source, args.part_rows, args.block_mib << 20,
                   args.max_reject_fraction)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="yfcc100m_dataset file: local path, file:// or s3:// URI; "
                        "plain, .bz2 or .gz")
    parser.add_argument("--part-rows", type=int, default=1_000_000,
                        help="maximum rows per Parquet part (default: 1000000)")
    parser.add_argument("--block-mib", type=int, default=16,
                        help="CSV reader block size in MiB; bounds memory (default: 16)")
    parser.add_argument("--max-reject-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of lines is malformed "
                        "(default: 0.01)")


def output_schema():
    """Schema of the metadata parts; times are UTC in milliseconds, as Parquet stores them."""
    import pyarrow as pa

    return pa.schema([
        ("line_number", pa.int64()), ("photo_id", pa.int64()), ("hash", pa.string()),
        ("user_nsid", pa.string()), ("user_nickname", pa.string()),
        ("date_taken", pa.timestamp("ms")), ("date_taken_valid", pa.bool_()),
        ("date_uploaded", pa.timestamp("ms")), ("device", pa.string()),
        ("title", pa.string()), ("description", pa.string()),
        ("user_tags", pa.list_(pa.string())), ("machine_tags", pa.list_(pa.string())),
        ("longitude", pa.float64()), ("latitude", pa.float64()), ("accuracy", pa.int32()),
        ("page_url", pa.string()), ("download_url", pa.string()),
        ("license_name", pa.string()), ("license_url", pa.string()),
        ("server_id", pa.int32()), ("farm_id", pa.int32()), ("secret", pa.string()),
        ("secret_original", pa.string()), ("extension", pa.string()),
        ("is_video", pa.bool_()),
    ])


_HEX_VALUES = {ord(c): int(c, 16) for c in "0123456789abcdefABCDEF"}


def _percent_decode_buffer(array):
    """Percent-decode every value of a string array in one numpy pass over its buffer.

    Returns None when the decoded bytes are not valid UTF-8, so the caller can fall
    back to Python, which replaces invalid sequences as `urllib.parse.unquote` does.
    """
    import numpy as np
    import pyarrow as pa

    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    array = pa.concat_arrays([array])  # a fresh array whose offsets start at 0
    offsets = np.frombuffer(array.buffers()[1], np.int32)[: len(array) + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8)[: offsets[-1]].copy()

    lookup = np.full(256, -1, np.int16)
    for code, value in _HEX_VALUES.items():
        lookup[code] = value
    candidates = np.flatnonzero(data[:-2] == ord("%")) if len(data) > 2 else np.empty(0, int)
    high, low = lookup[data[candidates + 1]], lookup[data[candidates + 2]]
    # A triple must be hex on both digits and must not run into the next value.
    owner_end = offsets[np.searchsorted(offsets, candidates, side="right")]
    valid = (high >= 0) & (low >= 0) & (candidates + 2 < owner_end)
    # Triples cannot overlap: both digits of a triple are hex, so neither is a '%'.
    triples = candidates[valid]
    data[triples] = (lookup[data[triples + 1]] * 16 + lookup[data[triples + 2]]).astype(np.uint8)
    keep = np.ones(len(data), bool)
    keep[triples + 1] = False
    keep[triples + 2] = False
    removed = np.concatenate([[0], np.cumsum(~keep)])
    new_offsets = (offsets - removed[offsets]).astype(np.int32)
    decoded = pa.StringArray.from_buffers(len(array), pa.py_buffer(new_offsets),
                                          pa.py_buffer(data[keep].tobytes()),
                                          array.buffers()[0], array.null_count)
    try:
        decoded.validate(full=True)
    except pa.ArrowInvalid:
        return None
    return decoded


def _url_decode(array):
    """`urllib.parse.unquote_plus` over a string array, vectorized."""
    import pyarrow as pa
    import pyarrow.compute as pc

    spaced = pc.replace_substring(array, "+", " ")
    escaped = pc.fill_null(pc.match_substring(array, "%"), False)
    if not pc.any(escaped).as_py():
        return spaced
    decoded = _percent_decode_buffer(spaced)
    if decoded is not None:
        return decoded
    values = [urllib.parse.unquote(value) for value in spaced.filter(escaped).to_pylist()]
    return pc.replace_with_mask(spaced, escaped, pa.array(values, pa.string()))


def _decode_tags(array):
    """Split comma-separated, URL-encoded tags into lists, dropping empty tags."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pc.split_pattern(array, ",")
    values = pc.list_flatten(lists)
    keep = pc.not_equal(values, "")
    parents = pc.list_parent_indices(lists).to_numpy()[keep.to_numpy(zero_copy_only=False)]
    counts = np.bincount(parents, minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), _url_decode(values.filter(keep)))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Rejects:
    """Collects malformed lines with their 1-based physical line number and reason.

    The CSV reader drops lines with a wrong column count before the typed checks see
    the block, so a row's physical line is its index among the parsed rows plus the
    number of dropped lines before it.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.dropped_lines: list[int] = []

    def physical_line(self, parsed_index: int) -> int:
        line = parsed_index + 1
        for dropped in self.dropped_lines:
            if dropped <= line:
                line += 1
        return line

    def add(self, line_number: int | None, reason: str, text: str) -> None:
        if len(self.rows) < 10:
            logger.warning("rejected line %s: %s", line_number, reason)
        elif len(self.rows) == 10:
            logger.warning("further rejected lines are only written to the rejects file")
        self.rows.append({"line": line_number, "reason": reason, "text": text[:500]})


def _decode_utf8(batch, positions, rejects: _Rejects):
    """Turn the block's binary columns into strings; lines with invalid UTF-8 become rejects."""
    import pyarrow as pa

    invalid: dict[int, str] = {}
    for name in DATASET_COLUMNS:
        try:
            batch.column(name).cast(pa.string())
        except pa.ArrowInvalid:
            for index, value in enumerate(batch.column(name).to_pylist()):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    invalid.setdefault(index, name)
    if invalid:
        for index, name in sorted(invalid.items()):
            rejects.add(rejects.physical_line(positions[index].as_py()),
                        f"invalid UTF-8 in column {name}",
                        batch.column(name)[index].as_py().decode("utf-8", "replace"))
        keep = pa.array([index not in invalid for index in range(batch.num_rows)])
        batch, positions = batch.filter(keep), positions.filter(keep)
    strings = pa.schema([(name, pa.string()) for name in DATASET_COLUMNS])
    return batch.cast(strings), positions


def _convert_batch(batch, first_index: int, rejects: _Rejects):
    """Type one block of raw columns; rows that cannot be typed become rejects.

    `first_index` is the position of the block's first row among all parsed rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    positions = pa.array(range(first_index, first_index + batch.num_rows), pa.int64())
    batch, positions = _decode_utf8(batch, positions, rejects)
    columns = {name: batch.column(name) for name in DATASET_COLUMNS}
    digits = "^[0-9]+$"
    valid = pc.and_(pc.match_substring_regex(columns["line_number"], digits),
                    pc.match_substring_regex(columns["photo_id"], digits))
    valid = pc.and_(valid, pc.match_substring_regex(columns["date_uploaded_text"], digits))
    valid = pc.and_(valid, pc.is_in(columns["marker"], pa.array(["0", "1"])))
    valid = pc.fill_null(valid, False)
    if not pc.all(valid).as_py():
        for index in pc.indices_nonzero(pc.invert(valid)).to_pylist():
            row = {name: columns[name][index].as_py() for name in DATASET_COLUMNS}
            reason = "non-numeric line number, photo id or upload time, or marker not 0/1"
            rejects.add(rejects.physical_line(positions[index].as_py()), reason,
                        "\t".join(str(v) for v in row.values()))
        batch = batch.filter(valid)
        positions = positions.filter(valid)
        columns = {name: batch.column(name) for name in DATASET_COLUMNS}

    uploaded = pc.cast(columns["date_uploaded_text"], pa.int64())
    plausible = pc.and_(pc.greater_equal(uploaded, MIN_UPLOAD_SECONDS),
                        pc.less(uploaded, MAX_UPLOAD_SECONDS))
    if not pc.all(plausible).as_py():
        for index in pc.indices_nonzero(pc.invert(plausible)).to_pylist():
            rejects.add(rejects.physical_line(positions[index].as_py()),
                        f"impossible upload time {uploaded[index].as_py()}",
                        str(columns["photo_id"][index].as_py()))
        batch = batch.filter(plausible)
        columns = {name: batch.column(name) for name in DATASET_COLUMNS}
        uploaded = pc.cast(columns["date_uploaded_text"], pa.int64())

    taken_text = pc.replace_substring_regex(columns["date_taken_text"], r"\.\d+$", "")
    taken = pc.strptime(taken_text, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)

    def number(name, arrow_type):
        text = columns[name]
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        return pc.cast(text, arrow_type, safe=False) if arrow_type == pa.float64() else \
            pc.cast(pc.if_else(pc.match_substring_regex(text, "^-?[0-9]+$"), text,
                               pa.scalar(None, pa.string())), arrow_type)

    arrays = {
        "line_number": pc.cast(columns["line_number"], pa.int64()),
        "photo_id": pc.cast(columns["photo_id"], pa.int64()),
        "date_taken": pc.cast(taken, pa.timestamp("ms")),
        "date_taken_valid": pc.fill_null(pc.is_valid(taken), False),
        "date_uploaded": pc.cast(pc.cast(uploaded, pa.timestamp("s")), pa.timestamp("ms")),
        "longitude": number("longitude", pa.float64()),
        "latitude": number("latitude", pa.float64()),
        "accuracy": number("accuracy", pa.int32()),
        "server_id": number("server_id", pa.int32()),
        "farm_id": number("farm_id", pa.int32()),
        "is_video": pc.equal(columns["marker"], "1"),
    }
    for name in PLAIN_TEXT_COLUMNS:
        arrays[name] = columns[name]
    for name in URL_ENCODED_COLUMNS:
        arrays[name] = _url_decode(columns[name])
    for name in TAG_COLUMNS:
        arrays[name] = _decode_tags(columns[name])
    schema = output_schema()
    return pa.table([arrays[field.name] for field in schema], schema=schema)


def convert(path: Path, store: ArtifactStore, version: str, config: Config) -> dict:
    """Stream `path` into Parquet parts under `metadata/<version>/`; return counts."""
    import pyarrow as pa
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    rejects = _Rejects()

    def handle_invalid_row(row) -> str:
        rejects.dropped_lines.append(row.number)
        rejects.add(row.number, f"expected {row.expected_columns} columns, found "
                    f"{row.actual_columns}", row.text)
        return "skip"

    read_options = csv.ReadOptions(column_names=DATASET_COLUMNS, block_size=config.block_bytes,
                                   use_threads=False)  # so invalid rows carry line numbers
    parse_options = csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                     newlines_in_values=False,
                                     invalid_row_handler=handle_invalid_row)
    convert_options = csv.ConvertOptions(
        # Binary, so that one line with invalid UTF-8 becomes a reject instead of failing
        # the whole block.
        column_types={name: pa.binary() for name in DATASET_COLUMNS},
        strings_can_be_null=False, quoted_strings_can_be_null=False,
    )
    parts: list[dict] = []
    rows = 0
    writer = None
    part_rows = 0
    staged = None

    def close_part():
        nonlocal writer, staged, part_rows
        if writer is None:
            return
        writer.close()
        key = f"metadata/{version}/part-{len(parts):05d}.parquet"
        store.put_file(staged, key)
        parts.append({"key": key, "rows": part_rows})
        staged.unlink()
        writer, staged, part_rows = None, None, 0

    import tempfile

    with tempfile.TemporaryDirectory(prefix="clear-metadata-") as tmp, \
            pa.input_stream(str(path), compression="detect") as stream:
        try:
            reader = csv.open_csv(stream, read_options=read_options,
                                  parse_options=parse_options, convert_options=convert_options)
        except (pa.ArrowInvalid, OSError) as error:
            raise StageError(f"cannot parse {config.source!r} as tab-separated "
                             f"yfcc100m_dataset ({ascii(str(error)[:200])}); pass a non-empty "
                             "yfcc100m_dataset file, plain, .bz2 or .gz") from error
        parsed = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError) as error:
                raise StageError(
                    f"cannot read {config.source!r} after {parsed} lines: "
                    f"{ascii(str(error)[:200])}; check that the file is complete and that its "
                    "name ends in .bz2 or .gz only when it is compressed"
                ) from error
            table = _convert_batch(batch, parsed, rejects)
            parsed += batch.num_rows
            offset = 0
            while offset < table.num_rows:
                if writer is None:
                    staged = Path(tmp) / f"part-{len(parts):05d}.parquet"
                    writer = pq.ParquetWriter(staged, table.schema, compression="zstd")
                take = min(config.part_rows - part_rows, table.num_rows - offset)
                writer.write_table(table.slice(offset, take))
                part_rows += take
                rows += take
                offset += take
                if part_rows >= config.part_rows:
                    close_part()
        close_part()
    rejects_key = f"metadata/{version}/rejects.jsonl"
    store.write_text(rejects_key, "".join(json.dumps(r) + "\n" for r in rejects.rows))
    return {"rows": rows, "rejected": len(rejects.rows), "parts": parts, "rejects": rejects_key}


def run(config: Config) -> dict:
    store = ArtifactStore(config.artifact_root)
    store.ensure_writable()

    with open_input(config.source) as path:
        source = {"uri": config.source, "bytes": path.stat().st_size,
                  "sha256": _file_sha256(path)}
        options = {"part_rows": config.part_rows, "format": MANIFEST_FORMAT}
        previous = store.read_json(MANIFEST_KEY) if store.exists(MANIFEST_KEY) else None
        if previous and previous["source"] == source and previous["options"] == options:
            logger.info("metadata is up to date with %s (sha256 %s); nothing to do",
                        config.source, source["sha256"][:12])
            return {"rows": previous["rows"], "changed": False, "manifest": MANIFEST_KEY}

        version = "v-" + hashlib.sha256(json.dumps([source, options]).encode()).hexdigest()[:12]
        logger.info("converting %s (%d bytes) into %s", config.source, source["bytes"],
                    store.url(f"metadata/{version}"))
        store.delete_prefix(f"metadata/{version}/")
        result = convert(path, store, version, config)

    total = result["rows"] + result["rejected"]
    fraction = result["rejected"] / max(total, 1)
    if fraction > config.max_reject_fraction:
        raise StageError(
            f"{result['rejected']} of {total} lines in {config.source!r} are malformed "
            f"({fraction:.2%} > --max-reject-fraction {config.max_reject_fraction}); see "
            f"{store.url(result['rejects'])}, fix the source or raise the limit"
        )

    manifest = {"format": MANIFEST_FORMAT, "source": source, "options": options,
                "version": version, **result}
    store.write_json(MANIFEST_KEY, manifest)
    if previous and previous.get("version") != version:
        store.delete_prefix(f"metadata/{previous['version']}/")
    logger.info("wrote %d rows in %d parts, rejected %d lines", result["rows"],
                len(result["parts"]), result["rejected"])
    return {"rows": result["rows"], "rejected": result["rejected"], "changed": True,
            "manifest": MANIFEST_KEY}


def load_metadata(store: ArtifactStore, columns: list[str] | None = None):
    """Read the committed metadata parts as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not store.exists(MANIFEST_KEY):
        raise StageError(f"no metadata under {store.root!r}: run sync-metadata first")
    manifest = store.read_json(MANIFEST_KEY)
    tables = []
    for part in manifest["parts"]:
        with store.local_copy(part["key"]) as path:
            tables.append(pq.read_table(path, columns=columns))
    if not tables:
        return output_schema().empty_table() if columns is None else \
            pa.schema([output_schema().field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)



