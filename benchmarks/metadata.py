"""Benchmark sync-metadata against pyarrow.csv and a plain Python parser on the same file.

Builds a file by repeating the bundled 600-line sample (photo ids and line numbers made
unique) to `--lines` lines, then measures in one invocation:

- ours: `python -m tasks sync-metadata` end to end (parse, type, URL-decode, Parquet);
- peer: `pyarrow.csv.read_csv` of the same uncompressed file into a table of strings;
- limit: a plain Python loop that splits lines and URL-decodes fields, like the
  original CLEAR scripts.

Each measurement runs in a subprocess so peak RSS is its own. Prints a table, then one
JSON object per comparison.
"""

from __future__ import annotations

import argparse
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

PLAIN_PYTHON_READ = """
import sys, urllib.parse
rows = 0
with open(sys.argv[1], encoding="utf-8") as handle:
    for line in handle:
        fields = line.rstrip("\\n").split("\\t")
        record = {"id": int(fields[1]), "uploaded": int(fields[6]),
                  "title": urllib.parse.unquote_plus(fields[8]),
                  "description": urllib.parse.unquote_plus(fields[9]),
                  "tags": [urllib.parse.unquote_plus(t) for t in fields[10].split(",") if t],
                  "url": fields[16]}
        rows += 1
print(rows)
"""


def build_input(path: Path, lines: int) -> None:
    sample = [line.split("\t") for line in SAMPLE.read_text().splitlines()]
    with open(path, "w") as handle:
        for number in range(lines):
            fields = list(sample[number % len(sample)])
            fields[0] = str(number)
            fields[1] = str(10_000_000_000 + number)
            handle.write("\t".join(fields) + "\n")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000,
                        help="lines in the generated input (default: 1000000)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="clear-bench-metadata-") as tmp:
        source = Path(tmp) / "yfcc100m_dataset"
        build_input(source, args.lines)
        size_mib = source.stat().st_size / 2**20
        plain_s, plain_rss = measure([sys.executable, "-c", PLAIN_PYTHON_READ, str(source)])
        arrow_s, arrow_rss = measure([sys.executable, "-c", PYARROW_READ, str(source)])
        ours_s, ours_rss = measure([sys.executable, "-m", "tasks", "sync-metadata",
                                    "--artifact-root", str(Path(tmp) / "root"),
                                    "--source", str(source)])

    machine = f"{os.cpu_count()} cores"
    print(f"sync-metadata benchmark: {args.lines} lines, {size_mib:.0f} MiB, {machine}")
    print(f"{'reader':<28}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    for name, seconds, rss in [("ours (sync-metadata)", ours_s, ours_rss),
                               ("pyarrow.csv strings", arrow_s, arrow_rss),
                               ("plain Python split", plain_s, plain_rss)]:
        print(f"{name:<28}{seconds:>10.2f}{args.lines / seconds:>12.0f}{rss:>14.0f}")
    ours_rate = args.lines / ours_s
    for peer, seconds, target in [("pyarrow.csv read_csv", arrow_s, 0.5),
                                  ("plain Python parser", plain_s, 5.0)]:
        peer_rate = args.lines / seconds
        print(json.dumps({"benchmark": "metadata", "metric": "rows_per_second",
                          "ours": round(ours_rate), "peer": peer, "peer_value": round(peer_rate),
                          "ratio": round(ours_rate / peer_rate, 2), "target": target,
                          "lines": args.lines, "peak_rss_mib": round(ours_rss),
                          "machine": machine}))


if __name__ == "__main__":
    main()
