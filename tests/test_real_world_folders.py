"""Real-world folders: phone photos (HEIC, AVIF), scans (JPEG 2000, 100+ megapixel PNGs); two runs on one
output folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from MLPipeline.Common import LOCK_NAME, UserError, output_lock
from MLPipeline.CreateDataset import IMAGE_EXTENSIONS, load_images, read_image, register_heif
from tests.conftest import ENGINE, FAST, ROOT
from tests.test_bad_input import assert_user_error, constant_png, encode

HUGE_SIDES = (10000, 10500)  # 105 megapixels: over the default --max-pixels (about 89 million)
RAISED_MAX_PIXELS = "200000000"
PILLOW_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP", ".gif": "GIF", ".heic": "HEIF", ".heif": "HEIF", ".avif": "AVIF", ".jp2": "JPEG2000"}


def encode_any(image: np.ndarray, format: str, **options) -> bytes:
    register_heif()  # Pillow writes HEIF too once pillow-heif is registered
    return encode(image, format, **options)


def quadrants() -> np.ndarray:
    """40 x 48 RGB in four flat colours: lossy formats keep it close, and a wrong turn shows."""
    image = np.full((40, 48, 3), 230, np.uint8)
    image[:20, :24], image[:20, 24:], image[20:, :24] = (220, 30, 20), (20, 180, 40), (30, 40, 200)
    return image


def rotated_photo(format: str) -> bytes:
    """quadrants() saved with EXIF orientation 6 (turn 90 degrees clockwise to display), as phones save photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_any(quadrants(), format, exif=exif.tobytes())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python engine.py ARGS`, its output decoded as the OS decodes file names, so that any bytes survive."""
    result = subprocess.run([sys.executable, str(ENGINE), *map(str, args)], cwd=ROOT, capture_output=True,
                            timeout=300)
    return subprocess.CompletedProcess(result.args, result.returncode, os.fsdecode(result.stdout),
                                       os.fsdecode(result.stderr))


# --- two runs on one output folder ----------------------------------------------------------------------------

def test_a_second_run_on_a_held_output_folder_stops_at_once_naming_the_first(tmp_path, tiny_data):
    out = tmp_path / "out"
    with output_lock(out):
        result = run_cli("train", "--data-dir", tiny_data, "--output-dir", out, *FAST)
        assert (out / LOCK_NAME).read_text() == f"PID {os.getpid()} on {os.uname().nodename}\n"
    assert_user_error(result, str(out), f"PID {os.getpid()}", "in use")
    assert "epoch" not in result.stdout
    assert not out.exists()  # released on leaving, and the folder it made for the lock removed


def test_the_lock_is_released_on_errors_and_a_folder_it_made_is_removed(tmp_path):
    made, kept = tmp_path / "new", tmp_path / "kept"
    kept.mkdir()
    for out in (made, kept):
        with pytest.raises(RuntimeError), output_lock(out):
            raise RuntimeError("a run that fails")
    assert not made.exists() and list(kept.iterdir()) == []
    with output_lock(kept), pytest.raises(UserError, match=f"PID {os.getpid()}"), output_lock(kept):
        pass  # the kernel's lock holds within one process too (each open is its own lock)


# --- formats, orientation, the pixel cap ----------------------------------------------------------------------

@pytest.mark.parametrize("extension", sorted(IMAGE_EXTENSIONS))
def test_every_listed_extension_decodes(tmp_path, extension):
    path = write(tmp_path / f"image{extension}", encode_any(quadrants(), PILLOW_FORMAT[extension]))
    image = read_image(path)
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - quadrants()).mean() < 8  # lossy formats are close, not equal


@pytest.mark.parametrize("format", ["HEIF", "AVIF", "JPEG"])
def test_phone_photo_rotation_is_applied(tmp_path, format):
    image = read_image(write(tmp_path / "photo", rotated_photo(format)))
    upright = np.rot90(quadrants(), k=-1)  # 90 degrees clockwise
    assert image.shape == upright.shape == (48, 40, 3)
    assert np.abs(image.astype(int) - upright).mean() < 8


def test_the_pixel_cap_names_the_flag_and_can_be_raised(tmp_path):
    path = write(tmp_path / "huge.png", constant_png(*HUGE_SIDES))
    images, skipped = load_images([str(path)], 32)
    assert len(images) == 0 and "10000x10500" in skipped[str(path)] and "--max-pixels" in skipped[str(path)]
    images, skipped = load_images([str(path)], 32, max_pixels=int(RAISED_MAX_PIXELS))
    assert images.shape == (1, 32, 32, 3) and not skipped
