"""Checks that downloaded bytes are a usable photograph, with Pillow.

The checks run from cheap to expensive: placeholder detection, byte size, the header
(format and pixel size, read without decoding), the pixel-count, edge and
aspect-ratio limits, and last a full decode that catches truncated or corrupt data.
Sizes are reported as displayed, that is after the EXIF orientation is applied, which
is also the size `tasks.images.decode_image` returns.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5 to 8 rotate by 90 or 270 degrees, which swaps width and height.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
PLACEHOLDER_PATH_MARKER = "photo_unavailable"
# sha256 digests of placeholder images that Flickr serves for deleted photos.
# NOTE: no digest has been verified against Flickr yet, so this set is empty and
# placeholders are recognised by the redirect target's path alone. Add digests with
# --placeholder-sha256.
KNOWN_PLACEHOLDER_SHA256: frozenset[str] = frozenset()
# What Pillow raises for corrupt data: its decoders and parsers use all of these.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# File extension for a member of the shard tar, by Pillow format name.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp",
              "TIFF": "tif", "MPO": "jpg"}


@dataclass(frozen=True)
class Limits:
    min_size: int
    min_edge: int
    max_aspect_ratio: float
    max_pixels: int
    placeholder_sha256: frozenset[str] = KNOWN_PLACEHOLDER_SHA256


@dataclass
class ImageCheck:
    """The verdict on one body: `status` is "ok" or the reason it was rejected."""

    status: str
    error: str | None
    sha256: str
    width: int | None = None
    height: int | None = None
    orientation: int | None = None
    format: str | None = None

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.format or "", (self.format or "bin").lower())


def check_image(body: bytes, final_url: str | None, limits: Limits) -> ImageCheck:
    """Classify `body`, returning a failure status instead of raising for bad image data."""
    sha256 = hashlib.sha256(body).hexdigest()

    if final_url and PLACEHOLDER_PATH_MARKER in urlsplit(final_url).path:
        return ImageCheck("unavailable", f"redirected to placeholder {final_url}", sha256)
    if sha256 in limits.placeholder_sha256:
        return ImageCheck("unavailable", f"body is a known placeholder (sha256 {sha256})",
                          sha256)
    if not body:
        return ImageCheck("empty", "response body is empty", sha256)
    if len(body) < limits.min_size:
        return ImageCheck("too_small", f"{len(body)} bytes is below --min-size "
                          f"{limits.min_size}", sha256)

    with warnings.catch_warnings():
        # Pillow warns above its own pixel limit; our --max-pixels check decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(body))
        except UnidentifiedImageError:
            return ImageCheck("not_image", f"not a recognised image format "
                              f"(starts with {body[:16]!r})", sha256)
        except Image.DecompressionBombError as error:
            return ImageCheck("too_many_pixels", str(error), sha256)
        except IMAGE_ERRORS as error:
            return ImageCheck("invalid_image", f"unreadable header: {error}", sha256)
        with image:
            return _check_opened(image, sha256, limits)


def _check_opened(image: Image.Image, sha256: str, limits: Limits) -> ImageCheck:
    stored_width, stored_height = image.size
    orientation = _orientation(image)
    width, height = stored_width, stored_height
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    result = ImageCheck("ok", None, sha256, width, height, orientation, image.format)

    pixels = width * height
    if pixels > limits.max_pixels:
        result.status = "too_many_pixels"
        result.error = (f"{width}x{height} = {pixels} pixels exceeds --max-pixels "
                        f"{limits.max_pixels}")
        return result
    if min(width, height) < limits.min_edge:
        result.status = "filtered_min_edge"
        result.error = f"{width}x{height} has an edge below --min-edge {limits.min_edge} px"
        return result
    aspect_ratio = max(width, height) / max(min(width, height), 1)
    if aspect_ratio > limits.max_aspect_ratio:
        result.status = "filtered_aspect_ratio"
        result.error = (f"{width}x{height} has aspect ratio {aspect_ratio:.2f}, above "
                        f"--max-aspect-ratio {limits.max_aspect_ratio:g}")
        return result

    try:
        image.load()
    except (*IMAGE_ERRORS, Image.DecompressionBombError) as error:
        result.status = "invalid_image"
        result.error = f"decoding failed: {error}"
    return result


def _orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG)
    except (*IMAGE_ERRORS, TypeError):
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None
