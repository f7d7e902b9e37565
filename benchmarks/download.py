"""Benchmark the download stage against img2dataset on the same URLs and the same server.

Starts a local aiohttp server on 127.0.0.1 that responds to every photo URL after a
fixed added latency (50 ms by default) with a real ~500 px JPEG held in memory, then runs one
after the other in one invocation:

- limit: a bare aiohttp client that only reads the bodies, to show what this machine's
  client side can reach against the server (and that the server is not the bottleneck);
- ours: `python -m tasks download` on a shard plan listing the URLs;
- peer: img2dataset in its own virtual environment (created on first use under
  ~/.cache/clear-bench), with `--resize_mode no --disable_all_reencoding True` and
  webdataset output.

Both downloaders get the same timeout, no retries and the same number of requests in
flight. Each run is a subprocess, measured for wall time, CPU seconds of its whole
process tree (user + system, from os.wait4) and peak memory: the largest single process
(ru_maxrss) and the sampled sum of PSS over the tree. Prints a table, then one JSON
object per comparison.

The photos: a pool of distinct scikit-image photographs (see tasks.sample_mirror), and
every photo id gets its own bytes because the server inserts a JPEG comment segment
holding the id. Our stage decodes every image fully with Pillow to validate it, while
img2dataset with --disable_all_reencoding stores the bytes without decoding them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PEER_VERSION = "1.47.0"
PEER_VENV = Path.home() / ".cache" / "clear-bench" / f"img2dataset-{PEER_VERSION}"
PHOTO_HOST = "farm1.staticflickr.com"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

RAW_CLIENT = """
import asyncio, sys, aiohttp

async def main(path, concurrency):
    urls = [line.strip() for line in open(path) if line.strip()]
    queue = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker():
            nonlocal ok
            while not queue.empty():
                url = queue.get_nowait()
                async with session.get(url) as response:
                    body = await response.read()
                    ok += response.status == 200 and len(body) > 0
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(ok)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


# ---------------------------------------------------------------- server


def photo_url(base_url: str, photo_id: int) -> str:
    return f"{base_url}/{PHOTO_HOST}/{photo_id % 10_000}/{photo_id}_{photo_id:08x}.jpg"


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """Insert a JPEG COM segment holding `text` right after the SOI marker."""
    segment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
    return jpeg[:2] + segment + jpeg[2:]


def serve(args: argparse.Namespace) -> None:
    """Run the photo server until SIGTERM; writes the bound port to --port-file."""
    from aiohttp import web

    sys.path.insert(0, str(REPOSITORY))
    from tasks.sample_mirror import make_photo_jpeg, photo_id_from_path, write_port_file

    pool = [make_photo_jpeg(number) for number in range(args.distinct_photos)]
    latency = args.latency_ms / 1000
    served = {"requests": 0, "bytes": 0}

    async def photo(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)
        photo_id = photo_id_from_path(request.path)
        if photo_id is None:
            return web.Response(status=404, text="not found\n")
        body = with_comment(pool[photo_id % len(pool)], b"photo %d" % photo_id)
        served["requests"] += 1
        served["bytes"] += len(body)
        return web.Response(body=body, content_type="image/jpeg")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(served)

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/_stats", stats)
        app.router.add_get("/{tail:.+}", photo)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        write_port_file(Path(args.port_file), port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())


class PhotoServer:
    """The server of `serve` in a subprocess, so its CPU time is not the clients'."""

    def __init__(self, latency_ms: float, distinct_photos: int, work: Path):
        self.port_file = work / "server.port"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "serve", "--port-file", str(self.port_file),
             "--latency-ms", str(latency_ms), "--distinct-photos", str(distinct_photos)])
        deadline = time.monotonic() + 120
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise SystemExit(f"error: the photo server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("error: the photo server did not start within 120 s")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{int(self.port_file.read_text())}"

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def requests(self) -> int:
        import urllib.request

        with urllib.request.urlopen(self.base_url + "/_stats", timeout=10) as response:
            return json.load(response)["requests"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------- measuring


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_pids(root: int) -> list[int]:
    """Return the pids of `root` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    pids, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        frontier.extend(children.get(pid, []))
    return pids


def tree_pss_bytes(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


@dataclass
class Measurement:
    seconds: float
    cpu_seconds: float
    max_rss_mib: float
    peak_tree_pss_mib: float
    output: str


def measure(command: list[str], env: dict | None = None, log: Path | None = None) -> Measurement:
    """Run `command`; return wall and CPU seconds of its tree and its peak memory."""
    start = time.perf_counter()
    with open(log or os.devnull, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env,
                                   cwd=REPOSITORY)
        peak_pss = 0
        stop = threading.Event()

        def sample_memory() -> None:
            nonlocal peak_pss
            while not stop.wait(0.2):
                peak_pss = max(peak_pss, tree_pss_bytes(process.pid))

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        output = process.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        detail = f"; see {log}" if log else ""
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}{detail}")
    return Measurement(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                       peak_pss / 2**20, output)


# ---------------------------------------------------------------- the three runs


def run_limit(urls: list[str], work: Path, concurrency: int) -> tuple[Measurement, int]:
    url_file = work / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    result = measure([sys.executable, "-c", RAW_CLIENT, str(url_file), str(concurrency)])
    return result, int(result.output.strip().splitlines()[-1])


def write_plan(root: Path, urls: list[str], photo_ids: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "shards").mkdir(parents=True)
    count = len(urls)
    table = pa.table({
        "photo_id": pa.array(photo_ids, pa.int64()),
        "line_number": pa.array(range(count), pa.int64()),
        "hash": pa.array([f"{photo_id:032x}" for photo_id in photo_ids], pa.string()),
        "download_url": pa.array(urls, pa.string()),
        "extension": pa.array(["jpg"] * count, pa.string()),
        "date_uploaded": pa.array([1_300_000_000 + i for i in range(count)], pa.timestamp("s")),
        "date_taken": pa.array([1_200_000_000 + i for i in range(count)], pa.timestamp("s")),
    })
    pq.write_table(table, root / "shards" / "shard-00000.parquet")
    plan = {"format": 1, "shard_size": count,
            "shards": [{"id": "00000", "key": "shards/shard-00000.parquet", "samples": count}]}
    (root / "shards" / "plan.json").write_text(json.dumps(plan))


def run_ours(urls: list[str], photo_ids: list[int], work: Path,
             args: argparse.Namespace) -> tuple[Measurement, int]:
    root = work / "ours"
    write_plan(root, urls, photo_ids)
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = measure([sys.executable, "-m", "tasks", "download", "--artifact-root", str(root),
                      "--shard", "00000", "--concurrency", str(args.concurrency),
                      "--per-host", str(args.concurrency), "--timeout", str(args.timeout),
                      "--retries", "0"], env=env, log=work / "ours.log")
    stats = json.loads((root / "images" / "shard-00000.stats.json").read_text())
    return result, stats["counts"].get("ok", 0)


def ensure_peer_venv() -> tuple[Path | None, str]:
    """Return img2dataset's executable and version, or None and why it is unavailable."""
    executable = PEER_VENV / "bin" / "img2dataset"
    if executable.exists():
        return executable, f"img2dataset {PEER_VERSION}"
    python = shutil.which("python3.11") or sys.executable
    commands = [[python, "-m", "venv", str(PEER_VENV)],
                [str(PEER_VENV / "bin" / "pip"), "install", "--quiet",
                 f"img2dataset=={PEER_VERSION}"]]
    print(f"creating {PEER_VENV} for the peer (one time)", flush=True)
    for command in commands:
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            shutil.rmtree(PEER_VENV, ignore_errors=True)
            errors = [line for line in completed.stderr.splitlines()
                      if not line.startswith("WARNING: Location")]
            return None, (f"`{' '.join(command)}` exited with {completed.returncode}: "
                          + " | ".join(errors[-5:]))
    return executable, f"img2dataset {PEER_VERSION}"


def run_peer(executable: Path, urls: list[str], work: Path,
             args: argparse.Namespace) -> tuple[Measurement, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    url_list = work / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), url_list)
    output = work / "peer"
    # One img2dataset shard per process, or a single shard would leave a process idle.
    per_shard = -(-len(urls) // args.peer_processes)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = measure([str(executable), "--url_list", str(url_list), "--input_format", "parquet",
                      "--url_col", "url", "--output_folder", str(output),
                      "--output_format", "webdataset", "--resize_mode", "no",
                      "--disable_all_reencoding", "True", "--timeout", str(int(args.timeout)),
                      "--retries", "0", "--processes_count", str(args.peer_processes),
                      "--thread_count", str(args.concurrency // args.peer_processes),
                      "--number_sample_per_shard", str(per_shard),
                      "--enable_wandb", "False"], env=env, log=work / "peer.log")
    successes = 0
    for stats in output.glob("*_stats.json"):
        successes += json.loads(stats.read_text())["successes"]
    return result, successes


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    server_parser = commands.add_parser("serve", help="run only the photo server (internal)")
    server_parser.add_argument("--port-file", required=True)
    for target in (parser, server_parser):
        target.add_argument("--latency-ms", type=float, default=50.0,
                            help="milliseconds the server waits before each response "
                            "(default: 50)")
        target.add_argument("--distinct-photos", type=int, default=256,
                            help="distinct photographs the server encodes at start; ids "
                            "share them but get their own bytes (default: 256)")
    parser.add_argument("--urls", type=int, default=5000,
                        help="URLs in the shared list (default: 5000)")
    parser.add_argument("--concurrency", type=int, default=128,
                        help="requests in flight: ours --concurrency and --per-host; "
                        "img2dataset processes x threads (default: 128)")
    parser.add_argument("--peer-processes", type=int, default=2,
                        help="img2dataset --processes_count (default: 2)")
    parser.add_argument("--timeout", type=float, default=10,
                        help="per-request timeout in seconds for both (default: 10; "
                        "img2dataset takes whole seconds)")
    parser.add_argument("--skip-peer", action="store_true",
                        help="measure only ours and the bare client")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
        return

    machine = f"{os.cpu_count()} cores"
    photo_ids = [10_000_000_000 + number for number in range(args.urls)]
    peer_executable, peer_name = (None, "skipped by --skip-peer")
    if not args.skip_peer:
        peer_executable, peer_name = ensure_peer_venv()
        if peer_executable is None:
            print(f"skipping the peer: {peer_name}")

    ours_name = "ours (python -m tasks download)"
    # Import time of each tool, measured apart: an estimate of the start-up inside its run.
    import_seconds = {ours_name: measure([sys.executable, "-c", "import tasks.download"]).seconds}
    if peer_executable is not None:
        import_seconds[peer_name] = measure(
            [str(peer_executable.parent / "python"), "-c", "import img2dataset"],
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}).seconds

    results = []
    with tempfile.TemporaryDirectory(prefix="clear-bench-download-") as tmp:
        work = Path(tmp)
        server = PhotoServer(args.latency_ms, args.distinct_photos, work)
        try:
            urls = [photo_url(server.base_url, photo_id) for photo_id in photo_ids]
            runs = [(LIMIT_NAME, lambda: run_limit(urls, work, args.concurrency)),
                    (ours_name, lambda: run_ours(urls, photo_ids, work, args))]
            if peer_executable is not None:
                runs.append((peer_name, lambda: run_peer(peer_executable, urls, work, args)))
            for name, run in runs:
                cpu_before, requests_before = server.cpu_seconds(), server.requests()
                measurement, ok = run()
                served = server.requests() - requests_before
                server_cpu = (server.cpu_seconds() - cpu_before) / max(served, 1)
                results.append(Result(name, measurement, ok, server_cpu,
                                      import_seconds.get(name)))
        finally:
            server.stop()

    print_table(results, args, machine)
    print_records(results, args, machine)


LIMIT_NAME = "bare aiohttp client (limit)"


@dataclass
class Result:
    name: str
    measurement: Measurement
    ok: int
    server_cpu_per_request: float
    import_seconds: float | None

    @property
    def images_per_second(self) -> float:
        return self.ok / self.measurement.seconds

    @property
    def images_per_second_after_import(self) -> float | None:
        if self.import_seconds is None:
            return None
        return self.ok / max(self.measurement.seconds - self.import_seconds, 1e-9)

    @property
    def cpu_seconds_per_image(self) -> float:
        return self.measurement.cpu_seconds / max(self.ok, 1)


def print_table(results: list[Result], args: argparse.Namespace, machine: str) -> None:
    print(f"download benchmark: {args.urls} URLs, {args.latency_ms:g} ms added latency, "
          f"{args.concurrency} requests in flight, timeout {args.timeout:g} s, no retries, "
          f"{machine}")
    print(f"{'client':<34}{'ok':>6}{'seconds':>9}{'images/s':>10}{'w/o import':>12}"
          f"{'CPU ms/image':>14}{'max RSS MiB':>13}{'tree PSS MiB':>14}"
          f"{'server CPU ms/req':>19}")
    for result in results:
        after_import = result.images_per_second_after_import
        print(f"{result.name:<34}{result.ok:>6}{result.measurement.seconds:>9.2f}"
              f"{result.images_per_second:>10.0f}"
              f"{'-' if after_import is None else f'{after_import:.0f}':>12}"
              f"{1000 * result.cpu_seconds_per_image:>14.2f}"
              f"{result.measurement.max_rss_mib:>13.0f}"
              f"{result.measurement.peak_tree_pss_mib:>14.0f}"
              f"{1000 * result.server_cpu_per_request:>19.3f}")
    print("w/o import: images/s after taking the tool's import time, measured apart, off its "
          "seconds; other start-up, such as img2dataset starting its worker processes, stays "
          "in")
    server_cpu = max(result.server_cpu_per_request for result in results)
    if server_cpu > 0:
        print(f"server capacity estimate: {1 / server_cpu:.0f} requests/s per core, from its "
              "largest CPU time per request")
    for result in results:
        if result.ok < 0.99 * args.urls:
            print(f"warning: {result.name} fetched only {result.ok} of {args.urls} images")


def print_records(results: list[Result], args: argparse.Namespace, machine: str) -> None:
    limit, ours, *peers = results
    comparisons = [(peer, "images_per_second", lambda result: result.images_per_second, 1.0)
                   for peer in peers]
    comparisons += [(peer, "cpu_seconds_per_image",
                     lambda result: result.cpu_seconds_per_image, None) for peer in peers]
    comparisons += [(peer, "peak_tree_pss_mib",
                     lambda result: result.measurement.peak_tree_pss_mib, None)
                    for peer in peers]
    comparisons.append((limit, "images_per_second", lambda result: result.images_per_second,
                        None))
    for peer, metric, value, target in comparisons:
        ours_value, peer_value = value(ours), value(peer)
        record = {"benchmark": "download", "metric": metric, "ours": round(ours_value, 4),
                  "peer": peer.name, "peer_value": round(peer_value, 4),
                  "ratio": round(ours_value / peer_value, 2) if peer_value else None,
                  "target": target}
        if metric == "images_per_second" and peer is not limit:
            record["ours_after_import"] = round(ours.images_per_second_after_import, 1)
            record["peer_after_import"] = round(peer.images_per_second_after_import, 1)
        record.update({"urls": args.urls, "latency_ms": args.latency_ms,
                       "concurrency": args.concurrency, "ok": ours.ok, "peer_ok": peer.ok,
                       "machine": machine})
        print(json.dumps(record))

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
