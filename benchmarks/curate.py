"""Benchmark curate's exact CLIP retrieval against faiss IndexFlatIP on the same embeddings.

Writes `--samples` random L2-normalized float32 embeddings of `--dim` values (1,000,000 x
512 by default, 2 GiB) to a raw file, draws `--concepts` normalized prompt embeddings,
and for each k in `--k` measures in one invocation:

- ours: `tasks.curate_retrieval.CandidateCollector` fed `--chunk-size` rows at a time,
  the way the curate stage feeds it one extract-clip chunk after another, keeping each
  concept's k best rows (`NUM_OF_IMAGES_PER_CLASS_PER_BUCKET_TO_QUERY` without
  BACKGROUND). "in memory" scores views of an array loaded before the clock starts.
  "streamed" reads each chunk from the file inside the timed loop and never holds the
  whole bucket, as the stage does;
- peer: faiss `IndexFlatIP` (exact inner product), `add` then `search`, on the array
  loaded before the clock starts.

Each measurement runs in a subprocess so peak RSS is its own. Prints a table, the share
of faiss's top-k rows that ours also returns, then one JSON object per comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]

# Arguments of every measurement script: data file, queries file, dim, k, chunk size,
# output file. Each prints the seconds of its timed section.
OURS_IN_MEMORY = """
import sys, time, numpy as np
from tasks.curate_retrieval import CandidateCollector
data_path, text_path, dim, k, chunk, out = sys.argv[1:]
dim, k, chunk = int(dim), int(k), int(chunk)
data = np.fromfile(data_path, dtype=np.float32).reshape(-1, dim)
text = np.load(text_path)
start = time.perf_counter()
collector = CandidateCollector(text, k, 0)
for first in range(0, len(data), chunk):
    rows = np.arange(first, min(first + chunk, len(data)), dtype=np.int64)
    collector.add(rows, data[first:first + chunk])
print(time.perf_counter() - start)
np.save(out, np.stack([ranked.rows for ranked in collector.top]))
"""

OURS_STREAMED = """
import sys, time, numpy as np
from tasks.curate_retrieval import CandidateCollector
data_path, text_path, dim, k, chunk, out = sys.argv[1:]
dim, k, chunk = int(dim), int(k), int(chunk)
text = np.load(text_path)
start = time.perf_counter()
collector = CandidateCollector(text, k, 0)
first = 0
with open(data_path, "rb") as handle:
    while True:
        block = np.fromfile(handle, dtype=np.float32, count=chunk * dim)
        if block.size == 0:
            break
        block = block.reshape(-1, dim)
        collector.add(np.arange(first, first + len(block), dtype=np.int64), block)
        first += len(block)
print(time.perf_counter() - start)
np.save(out, np.stack([ranked.rows for ranked in collector.top]))
"""

FAISS_FLAT_IP = """
import sys, time, numpy as np, faiss
data_path, text_path, dim, k, chunk, out = sys.argv[1:]
dim, k = int(dim), int(k)
data = np.fromfile(data_path, dtype=np.float32).reshape(-1, dim)
text = np.load(text_path)
start = time.perf_counter()
index = faiss.IndexFlatIP(dim)
index.add(data)
scores, rows = index.search(text, k)
print(time.perf_counter() - start)
np.save(out, rows.astype(np.int64))
"""


def write_embeddings(path: Path, samples: int, dim: int, seed: int) -> None:
    """Write `samples` x `dim` L2-normalized float32 rows, generated block by block."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        for first in range(0, samples, 65536):
            block = rng.standard_normal((min(65536, samples - first), dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            block.tofile(handle)


def measure(script: str, arguments: list[str]) -> tuple[float, float]:
    """Run `script`; return (seconds of its timed section, peak RSS of that child in MiB)."""
    # stderr goes to a file so that a chatty child cannot block on a full pipe.
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen([sys.executable, "-c", script, *arguments], cwd=REPOSITORY,
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"error: measurement exited with {process.returncode}:\n"
                             f"{errors.read()}")
    return float(stdout.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def overlap(ours: np.ndarray, peer: np.ndarray) -> float:
    """Return the mean share, over concepts, of the peer's top-k rows that ours also has."""
    shares = [len(set(ours_rows.tolist()) & set(peer_rows.tolist())) / len(peer_rows)
              for ours_rows, peer_rows in zip(ours, peer, strict=True)]
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000,
                        help="embeddings in the bucket (default: 1000000)")
    parser.add_argument("--dim", type=int, default=512,
                        help="embedding size; 512 for ViT-B/32 (default: 512)")
    parser.add_argument("--concepts", type=int, default=10,
                        help="prompts retrieved at once (default: 10)")
    parser.add_argument("--k", default="100,5000",
                        help="comma-separated rows retrieved per concept (default: 100,5000)")
    parser.add_argument("--chunk-size", type=int, default=8192,
                        help="rows per chunk fed to ours; extract-clip's default chunk size "
                        "(default: 8192)")
    args = parser.parse_args()
    sizes = [int(part) for part in args.k.split(",")]

    import faiss

    results = []
    with tempfile.TemporaryDirectory(prefix="clear-bench-curate-") as tmp:
        data_path, text_path = Path(tmp) / "embeddings.f32", Path(tmp) / "text.npy"
        write_embeddings(data_path, args.samples, args.dim, seed=0)
        text = np.random.default_rng(1).standard_normal((args.concepts, args.dim),
                                                        dtype=np.float32)
        np.save(text_path, text / np.linalg.norm(text, axis=1, keepdims=True))
        for k in sizes:
            measured = {}
            for name, script in [("faiss", FAISS_FLAT_IP), ("ours in memory", OURS_IN_MEMORY),
                                 ("ours streamed", OURS_STREAMED)]:
                out = Path(tmp) / f"rows-{k}-{name.replace(' ', '-')}.npy"
                seconds, rss = measure(script, [str(data_path), str(text_path), str(args.dim),
                                                str(k), str(args.chunk_size), str(out)])
                measured[name] = (seconds, rss, np.load(out))
            results.append((k, measured))

    machine = f"{os.cpu_count()} cores"
    peer = f"faiss-cpu {faiss.__version__} IndexFlatIP"
    data_mib = args.samples * args.dim * 4 / 2**20
    print(f"curate retrieval benchmark: {args.concepts} concepts over {args.samples} x "
          f"{args.dim} float32 embeddings ({data_mib:.0f} MiB), chunks of {args.chunk_size}, "
          f"{machine}")
    print(f"{'k':>6}  {'search':<26}{'seconds':>10}{'peak RSS MiB':>14}{'top-k overlap':>15}")
    for k, measured in results:
        faiss_rows = measured["faiss"][2]
        for name, label in [("ours in memory", "ours (CandidateCollector)"),
                            ("ours streamed", "ours, streamed from file"),
                            ("faiss", "faiss IndexFlatIP")]:
            seconds, rss, rows = measured[name]
            print(f"{k:>6}  {label:<26}{seconds:>10.2f}{rss:>14.0f}"
                  f"{overlap(rows, faiss_rows):>15.4f}")
    for k, measured in results:
        faiss_s, faiss_rss, _ = measured["faiss"]
        for name in ("ours in memory", "ours streamed"):
            ours_s, ours_rss, _ = measured[name]
            print(json.dumps({"benchmark": "curate", "metric": f"top{k}_seconds_{name}",
                              "ours": round(ours_s, 3), "peer": peer,
                              "peer_value": round(faiss_s, 3),
                              "ratio": round(faiss_s / ours_s, 2), "target": 0.8,
                              "samples": args.samples, "concepts": args.concepts,
                              "peak_rss_mib": round(ours_rss),
                              "peer_peak_rss_mib": round(faiss_rss), "machine": machine}))


if __name__ == "__main__":
    main()
