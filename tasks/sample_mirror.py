"""A local HTTP server that serves photos in place of Flickr's static photo hosts.

`GET /<host>/<path>/<photo_id>_<secret>[_<size>].<ext>` returns a JPEG of a real
photograph: one of scikit-image's bundled sample photos, chosen, cropped and flipped
according to the photo id, and scaled to at most 500 px on its longer side (the size
of Flickr's default download URLs). Every photo id gets its own bytes, and the same id
always gets the same bytes. Other paths return 404.

It pairs with `python -m tasks download --mirror-base-url http://127.0.0.1:PORT`, which
rewrites `http://farm8.staticflickr.com/7205/6985418911_df7747990d.jpg` to
`http://127.0.0.1:PORT/farm8.staticflickr.com/7205/6985418911_df7747990d.jpg`.

From a shell (port 0 picks a free port; the bound port is printed and written to
--port-file):

    python -m tasks.sample_mirror --port 0 --port-file /tmp/mirror.port

From Python:

    with SampleMirror() as mirror:
        ... mirror.base_url ...
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import random
import re
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

# scikit-image's bundled photographs (skimage/data); grayscale ones are served as RGB.
PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
               "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "brick.png",
               "grass.png", "camera.png", "gravel.png", "color.png")
DEFAULT_MAX_SIDE = 500
JPEG_QUALITY = 88
# Flickr photo file names: <photo_id>_<secret>[_<size suffix>].<ext>
PHOTO_FILE = re.compile(r"(?P<photo_id>\d+)_[0-9a-f]+(?:_[a-z0-9]+)?\.(?:jpg|jpeg|png|gif)")


def photo_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@functools.lru_cache(maxsize=len(PHOTO_NAMES))
def _source_photo(name: str):
    from PIL import Image

    with Image.open(photo_folder() / name) as image:
        return image.convert("RGB")


def make_photo(photo_id: int, max_side: int = DEFAULT_MAX_SIDE):
    """Build a real photograph as a PIL image, varied by `photo_id` through crop and flip."""
    from PIL import Image

    rng = random.Random(photo_id)
    image = _source_photo(PHOTO_NAMES[photo_id % len(PHOTO_NAMES)])
    width, height = image.size
    crop_width = int(width * rng.uniform(0.6, 1.0))
    crop_height = int(height * rng.uniform(0.6, 1.0))
    left = rng.randint(0, width - crop_width)
    top = rng.randint(0, height - crop_height)
    image = image.crop((left, top, left + crop_width, top + crop_height))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.thumbnail((max_side, max_side))
    return image


@functools.lru_cache(maxsize=256)
def make_photo_jpeg(photo_id: int, max_side: int = DEFAULT_MAX_SIDE) -> bytes:
    buffer = io.BytesIO()
    make_photo(photo_id, max_side).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def photo_id_from_path(path: str) -> int | None:
    """Parse the photo id from `/<host>/.../<photo_id>_<secret>.jpg`; None for other paths."""
    segments = path.split("?", 1)[0].strip("/").split("/")
    if len(segments) < 2:
        return None
    match = PHOTO_FILE.fullmatch(segments[-1])
    return int(match["photo_id"]) if match else None


class _Handler(BaseHTTPRequestHandler):
    server: _MirrorServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        photo_id = photo_id_from_path(self.path)
        if photo_id is None:
            body = b"not found: expected /<host>/<path>/<photo_id>_<secret>.jpg\n"
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        else:
            body = make_photo_jpeg(photo_id, self.server.max_side)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed
        logger.debug("%s %s", self.address_string(), format % args)


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], max_side: int):
        super().__init__(address, _Handler)
        self.max_side = max_side


class SampleMirror:
    """The mirror server running in a background thread; a context manager.

    `port=0` binds a free port; `base_url` gives the address to pass as
    `--mirror-base-url`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 max_side: int = DEFAULT_MAX_SIDE):
        self.host = host
        self.requested_port = port
        self.max_side = max_side
        self._server: _MirrorServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the sample mirror is not running; call start() first")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SampleMirror:
        self._server = _MirrorServer((self.host, self.requested_port), self.max_side)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="sample-mirror", daemon=True)
        self._thread.start()
        logger.info("sample mirror listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> SampleMirror:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.sample_mirror", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port; 0 picks a free one (default: 0)")
    parser.add_argument("--port-file", type=Path, default=None,
                        help="write the bound port to this file once listening, for "
                        "scripts that start the mirror with --port 0 (default: none)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help=f"longer side of served photos in pixels (default: "
                        f"{DEFAULT_MAX_SIDE})")
    return parser


def write_port_file(path: Path, port: int) -> None:
    """Write `port` atomically, so a script polling for the file never reads it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        sys.stderr.write(f"error: --port {args.port} is invalid: pass 0 to 65535\n")
        return 2
    if args.max_side < 1:
        sys.stderr.write(f"error: --max-side must be at least 1, got {args.max_side}\n")
        return 2
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    server = _MirrorServer((args.host, args.port), args.max_side)
    port = server.server_address[1]
    if args.port_file is not None:
        write_port_file(args.port_file, port)
    sys.stdout.write(f"sample mirror listening on http://{args.host}:{port}\n")
    sys.stdout.flush()

    # SIGTERM ends serve_forever through KeyboardInterrupt, like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("sample mirror on port %d stopping", port)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
