"""Real-world folders: phone photos (HEIC, AVIF), scans (JPEG 2000, 100+ megapixel PNGs), PDFs and other files,
unreadable folders, symlinks and loops; two runs on one output folder.

These tests run as root, whom permissions do not stop, so an unreadable folder is simulated: os.scandir
refuses it.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from MLPipeline.Common import LOCK_NAME, UserError, output_lock
from MLPipeline.CreateDataset import (IMAGE_EXTENSIONS, build_index, index_folder, load_images, read_image,
                                      register_heif)
from tests.conftest import ENGINE, FAST, ROOT, make_image_folder
from tests.test_bad_input import assert_user_error, cli, constant_png, encode, sample_rgb  # noqa: F401 (cli: fixture)

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


# --- folders: unreadable, links, only PDFs --------------------------------------------------------------------

def refuse_to_list(monkeypatch, folder: Path) -> None:
    """os.scandir(folder) fails as it would without read permission (which root has everywhere)."""
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing)


def test_an_unreadable_folder_is_named_with_the_reason_and_the_rest_is_used(tmp_path, monkeypatch, caplog):
    data = make_image_folder(tmp_path / "data", ("alpha", "beta"), per_class=3)
    locked = make_image_folder(data / "alpha", ("scans",), per_class=2) / "scans"
    refuse_to_list(monkeypatch, locked)
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        index = index_folder(data)
    assert f"cannot read folder {locked}: Permission denied" in caplog.text
    assert len(index) == 6 and not index.path.str.contains("scans").any()


def test_an_unreadable_data_folder_exits_2_naming_it(cli, tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", ("alpha", "beta"), per_class=3)
    refuse_to_list(monkeypatch, data)
    assert_user_error(cli("train", "--data-dir", data, "--output-dir", tmp_path / "out", *FAST),
                      f"cannot read folder {data}: Permission denied")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_file_is_named_with_the_reason(tmp_path, monkeypatch):
    path = write(tmp_path / "photo.png", encode(sample_rgb(), "PNG"))
    fromfile = np.fromfile

    def refusing(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return fromfile(file, *args, **kwargs)
    monkeypatch.setattr(np, "fromfile", refusing)
    assert load_images([str(path)], 32)[1] == {str(path): "cannot be read (Permission denied)"}


def test_a_loop_through_the_data_folder_is_not_followed(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", ("alpha", "beta"), per_class=3)
    (data / "alpha" / "up").symlink_to(data, target_is_directory=True)
    (data / "gamma").symlink_to(data, target_is_directory=True)  # a class folder that is the data folder
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        index = index_folder(data)
    assert sorted(index.label.unique()) == ["alpha", "beta"] and len(index) == 6
    assert caplog.text.count("leads back to") == 2


def test_a_folder_of_only_pdfs_is_no_images_and_each_class_says_why(tmp_path, caplog):
    for name in ("cards", "letters"):
        write(tmp_path / name / "scan.pdf", b"%PDF-1.4\n%%EOF\n")
    with caplog.at_level(logging.WARNING, logger="MLPipeline"), pytest.raises(UserError, match="no images found"):
        build_index(tmp_path)
    assert caplog.text.count("scan.pdf: PDF: export the pages as images") == 2
