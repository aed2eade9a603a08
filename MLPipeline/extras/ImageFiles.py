"""Reading one real-world file into 8-bit RGB pixels: every format, EXIF rotation, size limits, truncation.

The tool's decode path (Data.load_image) calls `read_image`; it either returns the pixels or raises BadImageError with the reason, for
any file: not an image, corrupt, truncated, too big, unreadable.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from MLPipeline.CreateDataset import BadImageError, resize

PILLOW_FORMATS = {"HEIF", "AVIF"}  # OpenCV cannot decode HEIF and ignores the rotation AVIF stores; Pillow does both
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # default of --max-pixels: Pillow's decompression-bomb limit (about 89 megapixels)
MIN_SIDE = 8  # smaller images carry nothing to classify

# OpenCV's own thread pool does not survive fork(): a DataLoader worker forked after the pool ran can hang in
# its first resize. Images are decoded one per worker in parallel instead (detectron2 and mmcv do the same).
cv2.setNumThreads(0)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # its warnings on bad files: ours name the file


def read_image(path: str | Path, min_size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file to an 8-bit RGB array (grayscale, alpha, 16-bit, palette and CMYK included).

    EXIF orientation is applied. Given `min_size`, big JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the result
    still has at least that many pixels a side: several times faster, and nothing is lost after the resize.
    Images over `max_pixels` (default MAX_PIXELS) are refused before they are decoded.
    Raises BadImageError, naming the reason, for files that are not usable images.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever, a device never end
            raise BadImageError("not a regular file (a FIFO, a device or a socket)")
        data = np.fromfile(path, dtype=np.uint8)  # unlike cv2.imread, works with non-ASCII names everywhere
    except OSError as error:
        raise BadImageError(f"cannot be read ({error.strerror or error})") from None
    if data.size == 0:
        raise BadImageError("empty file")
    width, height, image_format = read_header(data, max_pixels or MAX_PIXELS)
    if min(width, height) < MIN_SIDE:
        raise BadImageError(f"{width}x{height} is too small to classify")
    if image_format == "JPEG" and not jpeg_is_complete(data.tobytes()):
        raise BadImageError("truncated JPEG (no end-of-image marker)")  # OpenCV would fill the rest with grey
    if image_format in PILLOW_FORMATS:
        return decode_with_pillow(data)
    reduce = image_format == "JPEG" and min_size is not None
    try:
        image = cv2.imdecode(data, reduced_read_flag(width, height, min_size) if reduce else cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        return decode_with_pillow(data)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_header(data: np.ndarray, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, format) from the file's header alone; images over max_pixels are refused here."""
    register_heif()
    # Pillow refuses files over twice its own limit before their size can be read: keep its limit at least
    # ours, so that --max-pixels is the one limit (checked below, before every decode).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    too_large = f"is over {max_pixels} pixels, too large to decode safely (raise --max-pixels to decode it)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own cap below
            with Image.open(io.BytesIO(data.tobytes())) as header:  # reads the header only
                width, height, image_format = *header.size, header.format
    except Image.DecompressionBombError:
        raise BadImageError(f"the image {too_large}") from None
    except Exception:
        raise BadImageError("not an image, or corrupt") from None
    if width * height > max_pixels:
        raise BadImageError(f"{width}x{height} {too_large}")
    return width, height, image_format


def image_software(path: str | Path) -> str | None:
    """None when the file is not an image, judged by its content as Pillow reads headers (whatever its name);
    else the program that wrote it as the image says (a PNG's "Software" text: "Matplotlib version..." on
    this project's plots), "" when it does not say."""
    register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # reads the header and a PNG's text before its pixels
                return str(header.info.get("Software", ""))
    except Image.DecompressionBombError:
        return ""
    except Exception:  # Pillow raises many kinds for what is not an image
        return None


@functools.cache
def register_heif() -> None:
    """Let Pillow open HEIC/HEIF phone photos (pillow-heif applies their rotation); once, at the first decode."""
    import pillow_heif  # imported here: only a decode needs it, and importing it takes a moment
    pillow_heif.register_heif_opener()


def jpeg_is_complete(data: bytes) -> bool:
    """Whether the main image's compressed data ends with an end-of-image marker (FF D9).

    Walks the header segments to the first start-of-scan (FF DA), so the marker of an EXIF thumbnail does
    not count and data that phones append after the image does not matter. Compressed data never holds
    FF D9 (the format escapes FF bytes), so the first one after the scan starts is the real end.
    """
    position = 2  # after the start-of-image marker
    while position + 4 <= len(data) and data[position] == 0xFF:
        if data[position + 1] == 0xDA:
            return data.find(b"\xff\xd9", position) != -1
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return position + 4 <= len(data)  # a header we cannot walk: let the decoder judge it


def reduced_read_flag(width: int, height: int, min_size: int) -> int:
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if min(width, height) // factor >= min_size:
            return flag
    return cv2.IMREAD_COLOR


def decode_with_pillow(data: np.ndarray) -> np.ndarray:
    """Formats OpenCV lacks or gets wrong (GIF, HEIF, AVIF, some TIFFs): Pillow decodes them, first frame only."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception as error:
        raise BadImageError(f"cannot be decoded ({error})") from None


def load_image(path: str | Path, img_size: int, max_pixels: int | None = None) -> np.ndarray:
    """The recipe's load_image for any real-world file: read_image, then the recipe's resize."""
    return resize(read_image(path, img_size, max_pixels), img_size)


def loader(max_pixels: int | None):
    """load_image with its pixel limit, as a picklable callable for the recipe's ImageDataset."""
    return functools.partial(load_image, max_pixels=max_pixels)
