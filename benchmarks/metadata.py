"""Benchmark sync-metadata against pyarrow.csv and a CLEAR-style Python parser on one file.

Builds a file by repeating the bundled 600-line sample (photo ids and line numbers made
unique) to `--lines` lines, then measures in one invocation:

- ours: `python -m tasks sync-metadata` end to end (parse, type, URL-decode, Parquet);
- peer: `pyarrow.csv.read_csv` of the same uncompressed file into a table of strings;
- peer: a Python loop in the style of the original CLEAR scripts, which splits each
  line into a record held in memory and parses its dates.

It also compresses `--bz2-lines` lines with bzip2 and compares decompression alone
(rapidgzip on every core against pyarrow's single-threaded codec) and sync-metadata
end to end with `--decoder rapidgzip` against `--decoder pyarrow`.

`--memory-check` instead converts generated files of `--memory-lines` lines (default
1M and 10M, about 0.5 and 5 GB) one after another and deletes each after its run. It
prints the peak RSS of each conversion, which should stay flat and under 1.5 GB.

Each measurement runs in a subprocess so peak RSS is its own. Prints a table, then one
JSON object per comparison.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLE = REPOSITORY / "tests" / "data" / "yfcc100m_dataset_sample.tsv"

PYARROW_READ = """
import sys, pyarrow as pa, pyarrow.csv as csv
names = [f"c{i}" for i in range(25)]
table = csv.read_csv(sys.argv[1], read_options=csv.ReadOptions(column_names=names),
    parse_options=csv.ParseOptions(delimiter="\\t", quote_char=False),
    convert_options=csv.ConvertOptions(column_types={n: pa.string() for n in names}))
print(table.num_rows)
"""

# A parser in the style of the original CLEAR scripts (flickr_parsing.py in
# linzhiqiu/continual-learning): split each line, keep every field in a dataclass held
# in memory, and parse the two dates the CLEAR filters use, with dateutil's isoparse for
# the date taken as that script does. It writes no output, so it does less than ours.
PLAIN_PYTHON_READ = """
import sys
from dataclasses import make_dataclass
from datetime import datetime
from dateutil import parser
NAMES = ["line", "id", "hash", "user", "nickname", "date_taken", "date_uploaded", "device",
         "title", "description", "user_tags", "machine_tags", "lon", "lat", "accuracy",
         "page_url", "download_url", "license_name", "license_url", "server", "farm",
         "secret", "secret_original", "ext", "marker"]
Record = make_dataclass("Record", NAMES + ["taken", "uploaded"])
records = []
with open(sys.argv[1], encoding="utf-8") as handle:
    for line in handle:
        fields = line.rstrip("\\n").split("\\t")
        try:
            taken = parser.isoparse(fields[5])
        except ValueError:
            taken = None
        uploaded = datetime.utcfromtimestamp(int(fields[6]))
        records.append(Record(*fields, taken, uploaded))
print(len(records))
"""


DECOMPRESS = """
import os, sys, time
path, decoder = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if decoder == "rapidgzip":
    import rapidgzip
    handle = rapidgzip.IndexedBzip2File(path, parallelization=len(os.sched_getaffinity(0)))
else:
    import pyarrow as pa
    handle = pa.input_stream(path, compression="bz2")
total = 0
with handle:
    while chunk := handle.read(16 << 20):
        total += len(chunk)
print(total, time.perf_counter() - start)
"""


def build_input(path: Path, lines: int, compress: bool = False) -> None:
    """Write `lines` lines by repeating the sample, streaming so memory stays small."""
    sample = [line.split("\t") for line in SAMPLE.read_text().splitlines()]
    opener = bz2.open if compress else open
    with opener(path, "wt") as handle:
        batch = []
        for number in range(lines):
            fields = list(sample[number % len(sample)])
            fields[0] = str(number)
            fields[1] = str(10_000_000_000 + number)
            batch.append("\t".join(fields) + "\n")
            if len(batch) == 10_000:
                handle.write("".join(batch))
                batch.clear()
        handle.write("".join(batch))


def measure(command: list[str]) -> tuple[float, float]:
    """Run `command`; return (seconds, peak RSS of that child in MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with {process.returncode}")
    return seconds, usage.ru_maxrss / 1024


def sync_metadata(root: Path, source: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "tasks", "sync-metadata", "--artifact-root", str(root),
            "--source", str(source), *options]


def decompression_benchmark(lines: int, machine: str) -> None:
    """Compare rapidgzip with pyarrow's bzip2 codec, alone and inside sync-metadata."""
    with tempfile.TemporaryDirectory(prefix="clear-bench-metadata-") as tmp:
        source = Path(tmp) / "yfcc100m_dataset.bz2"
        build_input(source, lines, compress=True)
        compressed_mib = source.stat().st_size / 2**20
        rates, ends = {}, {}
        for decoder in ("pyarrow", "rapidgzip"):
            output = subprocess.run([sys.executable, "-c", DECOMPRESS, str(source), decoder],
                                    check=True, capture_output=True, text=True).stdout.split()
            rates[decoder] = int(output[0]) / 2**20 / float(output[1])
            ends[decoder] = measure(sync_metadata(Path(tmp) / f"root-{decoder}", source,
                                                  "--decoder", decoder))
    print(f"\nbzip2 decompression: {lines} lines, {compressed_mib:.0f} MiB compressed, {machine}")
    print(f"{'decoder':<28}{'MiB/s out':>10}{'end-to-end s':>14}{'peak RSS MiB':>14}")
    for decoder in ("rapidgzip", "pyarrow"):
        seconds, rss = ends[decoder]
        print(f"{decoder:<28}{rates[decoder]:>10.1f}{seconds:>14.2f}{rss:>14.0f}")
    for metric, ours, peer in [
            ("decompressed_mib_per_second", rates["rapidgzip"], rates["pyarrow"]),
            ("bz2_rows_per_second", lines / ends["rapidgzip"][0], lines / ends["pyarrow"][0])]:
        print(json.dumps({"benchmark": "metadata", "metric": metric, "ours": round(ours, 1),
                          "peer": "pyarrow bz2 codec (single thread)",
                          "peer_value": round(peer, 1), "ratio": round(ours / peer, 2),
                          "target": 1.0, "lines": lines, "machine": machine}))


def memory_check(sizes: list[int], machine: str) -> None:
    """Convert generated files of each size in turn and report the peak RSS of each run."""
    results = []
    for lines in sizes:
        with tempfile.TemporaryDirectory(prefix="clear-bench-metadata-") as tmp:
            source = Path(tmp) / "yfcc100m_dataset"
            build_input(source, lines)
            size_gib = source.stat().st_size / 2**30
            seconds, rss = measure(sync_metadata(Path(tmp) / "root", source))
        results.append((lines, size_gib, seconds, rss))
        print(f"converted {lines} lines ({size_gib:.2f} GiB) in {seconds:.1f} s, "
              f"peak RSS {rss:.0f} MiB", flush=True)
    print(f"\nsync-metadata memory check, {machine}")
    print(f"{'lines':>12}{'GiB':>8}{'seconds':>10}{'peak RSS MiB':>14}")
    for lines, size_gib, seconds, rss in results:
        print(f"{lines:>12}{size_gib:>8.2f}{seconds:>10.1f}{rss:>14.0f}")
    for lines, _, seconds, rss in results:
        print(json.dumps({"benchmark": "metadata", "metric": "peak_rss_mib", "ours": round(rss),
                          "peer": "limit 1.5 GiB", "peer_value": 1536,
                          "ratio": round(rss / 1536, 2), "target": 1.0, "lines": lines,
                          "seconds": round(seconds, 1), "machine": machine}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000,
                        help="lines in the generated input (default: 1000000)")
    parser.add_argument("--bz2-lines", type=int, default=200_000,
                        help="lines in the generated bzip2 input; compressing it takes about "
                        "10 s per 100000 lines on one core (default: 200000, 0 skips it)")
    parser.add_argument("--memory-check", action="store_true",
                        help="only run the memory check over --memory-lines")
    parser.add_argument("--memory-lines", default="1000000,10000000",
                        help="comma-separated line counts for --memory-check; 10M lines "
                        "need about 5 GB of temporary disk (default: 1000000,10000000)")
    args = parser.parse_args()
    machine = f"{os.cpu_count()} cores"
    if args.memory_check:
        memory_check([int(value) for value in args.memory_lines.split(",")], machine)
        return

    with tempfile.TemporaryDirectory(prefix="clear-bench-metadata-") as tmp:
        source = Path(tmp) / "yfcc100m_dataset"
        build_input(source, args.lines)
        size_mib = source.stat().st_size / 2**20
        plain_s, plain_rss = measure([sys.executable, "-c", PLAIN_PYTHON_READ, str(source)])
        arrow_s, arrow_rss = measure([sys.executable, "-c", PYARROW_READ, str(source)])
        ours_s, ours_rss = measure(sync_metadata(Path(tmp) / "root", source))

    print(f"sync-metadata benchmark: {args.lines} lines, {size_mib:.0f} MiB, {machine}")
    print(f"{'reader':<28}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    for name, seconds, rss in [("ours (sync-metadata)", ours_s, ours_rss),
                               ("pyarrow.csv strings", arrow_s, arrow_rss),
                               ("CLEAR-style Python parser", plain_s, plain_rss)]:
        print(f"{name:<28}{seconds:>10.2f}{args.lines / seconds:>12.0f}{rss:>14.0f}")
    ours_rate = args.lines / ours_s
    for peer, seconds, target in [("pyarrow.csv read_csv", arrow_s, 0.5),
                                  ("CLEAR-style Python parser", plain_s, 5.0)]:
        peer_rate = args.lines / seconds
        print(json.dumps({"benchmark": "metadata", "metric": "rows_per_second",
                          "ours": round(ours_rate), "peer": peer, "peer_value": round(peer_rate),
                          "ratio": round(ours_rate / peer_rate, 2), "target": target,
                          "lines": args.lines, "peak_rss_mib": round(ours_rss),
                          "machine": machine}))
    if args.bz2_lines:
        decompression_benchmark(args.bz2_lines, machine)


if __name__ == "__main__":
    main()
