"""Typing of raw yfcc100m_dataset columns: the Parquet schema, decoders and rejects.

`convert_batch` receives one block of raw binary columns of the 25-column layout, plus
the raw autotags text when an autotags file is joined, and returns a typed table. For
the 23-column layout, the line number and hash columns come from side files. Rows that
cannot be typed are written to the rejects file instead.
"""

from __future__ import annotations

import json
import logging
import urllib.parse

logger = logging.getLogger(__name__)

# Column names of the 25-column `yfcc100m_dataset` layout, in file order.
DATASET_COLUMNS = [
    "line_number", "photo_id", "hash", "user_nsid", "user_nickname", "date_taken_text",
    "date_uploaded_text", "device", "title", "description", "user_tags", "machine_tags",
    "longitude", "latitude", "accuracy", "page_url", "download_url", "license_name",
    "license_url", "server_id", "farm_id", "secret", "secret_original", "extension",
    "marker",
]
# The older layout, split over ten files, has neither line number nor hash.
OLD_DATASET_COLUMNS = [name for name in DATASET_COLUMNS if name not in ("line_number", "hash")]
AUTOTAGS_TEXT = "autotags_text"
URL_ENCODED_COLUMNS = ["user_nickname", "device", "title", "description"]
TAG_COLUMNS = ["user_tags", "machine_tags"]
PLAIN_TEXT_COLUMNS = ["hash", "user_nsid", "page_url", "download_url", "license_name",
                      "license_url", "secret", "secret_original", "extension"]
# Uploads outside this range cannot be YFCC100M photos (Flickr opened in 2004).
MIN_UPLOAD_SECONDS = 946_684_800     # 2000-01-01
MAX_UPLOAD_SECONDS = 4_102_444_800   # 2100-01-01
# One autotag: a concept without ',' or ':', a colon and a decimal score.
AUTOTAG_PATTERN = r"^[^,:]+:[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?$"


def autotag_type():
    import pyarrow as pa

    return pa.struct([("concept", pa.string()), ("score", pa.float32())])


def output_schema():
    """Schema of the metadata parts; times are UTC in milliseconds, as Parquet stores them.

    `autotags` is null when no autotags file was joined and an empty list for a photo
    without autotags.
    """
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
        ("is_video", pa.bool_()), ("autotags", pa.list_(autotag_type())),
    ])


_HEX_VALUES = {ord(c): int(c, 16) for c in "0123456789abcdefABCDEF"}


def _unquote_plus_buffer(array):
    """`unquote_plus` every value of a string array in one numpy pass over its buffer.

    Returns None when the decoded bytes are not valid UTF-8, so the caller can fall
    back to Python, which replaces invalid sequences as `urllib.parse.unquote` does.
    """
    import numpy as np
    import pyarrow as pa

    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    start = array.offset
    offsets = np.frombuffer(array.buffers()[1], np.int32)[start: start + len(array) + 1]
    if array.offset != 0 or (len(offsets) and offsets[0] != 0):
        array = pa.concat_arrays([array])  # a fresh array whose offsets start at 0
        offsets = np.frombuffer(array.buffers()[1], np.int32)[: len(array) + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8)[: offsets[-1]].copy()
    # '+' means a space; a '+' that was written as %2B is decoded after this, so it stays.
    data[data == ord("+")] = ord(" ")

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
    if len(triples) == 0:
        # Only spaces changed, which keeps valid UTF-8 valid.
        return pa.StringArray.from_buffers(len(array), pa.py_buffer(offsets.copy()),
                                           pa.py_buffer(data.tobytes()), array.buffers()[0],
                                           array.null_count)
    data[triples] = (lookup[data[triples + 1]] * 16 + lookup[data[triples + 2]]).astype(np.uint8)
    keep = np.ones(len(data), bool)
    keep[triples + 1] = False
    keep[triples + 2] = False
    # Each triple lies inside one value and gives back two bytes, so a value starts
    # 2 * (triples before its offset) bytes earlier than it did.
    removed = 2 * np.searchsorted(triples, offsets, side="left")
    new_offsets = (offsets - removed).astype(np.int32)
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

    decoded = _unquote_plus_buffer(array)
    if decoded is not None:
        return decoded
    spaced = pc.replace_substring(array, "+", " ")
    escaped = pc.fill_null(pc.match_substring(array, "%"), False)
    values = [urllib.parse.unquote(value) for value in spaced.filter(escaped).to_pylist()]
    return pc.replace_with_mask(spaced, escaped, pa.array(values, pa.string()))


def _split_list(array):
    """Split comma-separated values into (lists, non-empty items, list offsets)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pc.split_pattern(array, ",")
    values = pc.list_flatten(lists)
    keep = pc.not_equal(values, "")
    parents = pc.list_parent_indices(lists).to_numpy()[keep.to_numpy(zero_copy_only=False)]
    counts = np.bincount(parents, minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return values.filter(keep), pa.array(offsets), parents


def _decode_tags(array):
    """Split comma-separated, URL-encoded tags into lists, dropping empty tags."""
    import pyarrow as pa

    items, offsets, _ = _split_list(array)
    return pa.ListArray.from_arrays(offsets, _url_decode(items))


def _invalid_autotag_rows(array):
    """Return the row indices whose autotags text has an item that is not `concept:score`."""
    import numpy as np
    import pyarrow.compute as pc

    items, _, parents = _split_list(array)
    valid = pc.match_substring_regex(items, AUTOTAG_PATTERN).to_numpy(zero_copy_only=False)
    return np.unique(parents[~valid])


def _decode_autotags(array):
    """Parse validated `concept:score,...` texts into lists of (concept, score) structs.

    Concepts are kept as written: unlike the user tags they are not URL-encoded.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    items, offsets, _ = _split_list(array)
    fields = pc.extract_regex(items, r"^(?P<concept>.*):(?P<score>[^:]*)$")
    pairs = pa.StructArray.from_arrays(
        [fields.field("concept"), pc.cast(fields.field("score"), pa.float32())],
        fields=list(autotag_type()))
    return pa.ListArray.from_arrays(offsets, pairs)


class Rejects:
    """Writes malformed lines, with their source, 1-based physical line and reason, to a file.

    Rejects stream to a local JSON-lines file, so a source with many of them does not
    grow memory.
    """

    def __init__(self, path) -> None:
        self.path = path
        self.count = 0
        self._handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def add(self, source: str, line_number: int | None, reason: str, text: str) -> None:
        if self.count < 10:
            logger.warning("rejected line %s of %s: %s", line_number, source, reason)
        elif self.count == 10:
            logger.warning("further rejected lines are only written to the rejects file")
        self.count += 1
        self._handle.write(json.dumps({"source": source, "line": line_number,
                                       "reason": reason, "text": text[:500]}) + "\n")

    def close(self) -> None:
        self._handle.close()


def _decode_utf8(batch, lines, rejects: Rejects, source: str):
    """Turn the block's binary columns into strings; lines with invalid UTF-8 become rejects."""
    import pyarrow as pa

    invalid: dict[int, str] = {}
    for name in batch.schema.names:
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
            rejects.add(source, lines[index].as_py(), f"invalid UTF-8 in column {name}",
                        batch.column(name)[index].as_py().decode("utf-8", "replace"))
        keep = pa.array([index not in invalid for index in range(batch.num_rows)])
        batch, lines = batch.filter(keep), lines.filter(keep)
    strings = pa.schema([(name, pa.string()) for name in batch.schema.names])
    return batch.cast(strings), lines


def _reject_rows(batch, lines, bad_indices, rejects: Rejects, source: str, reason):
    """Write the rows at `bad_indices` to the rejects and return the batch without them."""
    import numpy as np
    import pyarrow as pa

    for index in bad_indices:
        text = "\t".join(str(batch.column(name)[index].as_py()) for name in batch.schema.names)
        rejects.add(source, lines[index].as_py(), reason(index), text)
    keep = np.ones(batch.num_rows, bool)
    keep[list(bad_indices)] = False
    keep = pa.array(keep)
    return batch.filter(keep), lines.filter(keep)


def convert_batch(batch, lines, rejects: Rejects, source: str):
    """Type one block of raw columns; rows that cannot be typed become rejects.

    `lines` contains each row's 1-based physical line number in `source`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    lines = pa.array(lines, pa.int64())
    batch, lines = _decode_utf8(batch, lines, rejects, source)
    # ascii_is_decimal: non-empty and only the ASCII digits 0-9.
    valid = pc.and_(pc.ascii_is_decimal(batch.column("line_number")),
                    pc.ascii_is_decimal(batch.column("photo_id")))
    valid = pc.and_(valid, pc.ascii_is_decimal(batch.column("date_uploaded_text")))
    valid = pc.and_(valid, pc.is_in(batch.column("marker"), pa.array(["0", "1"])))
    valid = pc.fill_null(valid, False)
    if not pc.all(valid).as_py():
        batch, lines = _reject_rows(
            batch, lines, pc.indices_nonzero(pc.invert(valid)).to_pylist(), rejects, source,
            lambda index: "non-numeric line number, photo id or upload time, or marker not 0/1")

    uploaded = pc.cast(batch.column("date_uploaded_text"), pa.int64())
    plausible = pc.and_(pc.greater_equal(uploaded, MIN_UPLOAD_SECONDS),
                        pc.less(uploaded, MAX_UPLOAD_SECONDS))
    if not pc.all(plausible).as_py():
        batch, lines = _reject_rows(
            batch, lines, pc.indices_nonzero(pc.invert(plausible)).to_pylist(), rejects, source,
            lambda index: f"impossible upload time {uploaded[index].as_py()}")
        uploaded = pc.cast(batch.column("date_uploaded_text"), pa.int64())

    has_autotags = AUTOTAGS_TEXT in batch.schema.names
    if has_autotags:
        invalid = _invalid_autotag_rows(batch.column(AUTOTAGS_TEXT))
        if len(invalid):
            batch, lines = _reject_rows(batch, lines, invalid.tolist(), rejects, source,
                                        lambda index: "autotags item is not concept:score")
            uploaded = pc.cast(batch.column("date_uploaded_text"), pa.int64())
    columns = {name: batch.column(name) for name in batch.schema.names}

    taken_text = pc.replace_substring_regex(columns["date_taken_text"], r"\.\d+$", "")
    taken = pc.strptime(taken_text, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)

    def number(name, arrow_type):
        text = columns[name]
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        return pc.cast(text, arrow_type, safe=False) if arrow_type == pa.float64() else \
            pc.cast(pc.if_else(pc.match_substring_regex(text, "^-?[0-9]+$"), text,
                               pa.scalar(None, pa.string())), arrow_type)

    schema = output_schema()
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
        "autotags": _decode_autotags(columns[AUTOTAGS_TEXT]) if has_autotags else
        pa.nulls(batch.num_rows, schema.field("autotags").type),
    }
    for name in PLAIN_TEXT_COLUMNS:
        arrays[name] = columns[name]
    for name in URL_ENCODED_COLUMNS:
        arrays[name] = _url_decode(columns[name])
    for name in TAG_COLUMNS:
        arrays[name] = _decode_tags(columns[name])
    return pa.table([arrays[field.name] for field in schema], schema=schema)
