"""Tests of the local sample mirror that serves photos in place of Flickr's photo hosts."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tasks.sample_mirror import SampleMirror, make_photo_jpeg, photo_id_from_path

ROOT = Path(__file__).resolve().parent.parent
PHOTO_PATH = "/farm8.staticflickr.com/7205/6985418911_df7747990d.jpg"


@pytest.fixture
def mirror():
    with SampleMirror(max_side=64) as mirror:
        yield mirror


@pytest.mark.parametrize(("path", "photo_id"), [
    (PHOTO_PATH, 6985418911),
    ("/farm6.staticflickr.com/5465/10201275523_3e6ea67c7f_b.jpg", 10201275523),
    ("/host/1_ab.jpg?zz=1", 1),
    ("/6985418911_df7747990d.jpg", None),
    ("/host/6985418911.jpg", None),
    ("/host/notes.txt", None),
])
def test_photo_id_from_path(path, photo_id):
    assert photo_id_from_path(path) == photo_id


def test_photos_vary_by_id():
    first = make_photo_jpeg(1, 64)
    again = make_photo_jpeg(1, 64)
    neighbour = make_photo_jpeg(13, 64)

    assert first == again
    assert first != neighbour


def test_photo_max_side_default():
    with Image.open(io.BytesIO(make_photo_jpeg(5))) as image:
        assert max(image.size) == 500
        assert image.format == "JPEG"


def test_mirror_serves_jpeg(mirror):
    with urllib.request.urlopen(mirror.base_url + PHOTO_PATH, timeout=5) as response:
        body = response.read()
        content_type = response.headers["Content-Type"]

    assert content_type == "image/jpeg"
    assert body == make_photo_jpeg(6985418911, 64)
    with Image.open(io.BytesIO(body)) as image:
        assert max(image.size) == 64


def test_mirror_unknown_path_404(mirror):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(mirror.base_url + "/index.html", timeout=5)

    assert caught.value.code == 404


def test_mirror_command_writes_port(tmp_path):
    port_file = tmp_path / "mirror.port"
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.sample_mirror", "--port", "0", "--port-file",
         str(port_file), "--max-side", "32"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the mirror wrote no port file in 20 s"
            time.sleep(0.05)
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{PHOTO_PATH}",
                                    timeout=5) as response:
            body = response.read()
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=10)

    assert process.returncode == 0
    assert f"http://127.0.0.1:{port}" in stdout
    with Image.open(io.BytesIO(body)) as image:
        assert max(image.size) == 32


def test_mirror_command_bad_port():
    result = subprocess.run(
        [sys.executable, "-m", "tasks.sample_mirror", "--port", "70000"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=20,
    )

    assert result.returncode == 2
    assert "--port 70000 is invalid" in result.stderr
