"""Real-world folders: phone photos (HEIC, AVIF), scans (JPEG 2000, 100+ megapixel PNGs), PDFs and other files,
sidecar files, names that are not even UTF-8, unreadable folders, symlinks and loops, duplicates across the
splits, and two runs on one output folder.

One folder holding all of it is trained on by a real `python engine.py` with the defaults, and again in-process
with --max-pixels raised and --dedupe; predict --csv runs on its odd names. These tests run as root, whom
permissions do not stop, so an unreadable folder is simulated: os.scandir refuses it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Data import build_index, load_images
from MLPipeline.extras.Files import held_out_copies, IMAGE_EXTENSIONS, index_folder, read_image, register_heif
from MLPipeline.extras.OutputFolder import LOCK_NAME, output_lock
from tests.conftest import ENGINE, FAST, ROOT, make_image_folder
from tests.test_bad_input import assert_user_error, constant_png, encode, sample_rgb

NON_UTF8 = os.fsdecode(b"re\xe7u \xff scan.png")  # Latin-1 bytes, as old cameras and zip files leave them
NON_UTF8_BROKEN = os.fsdecode(b"\xff\xfe broken.jpg")
HUGE_SIDES = (10000, 10500)  # 105 megapixels: over the default --max-pixels (about 89 million)
RAISED_MAX_PIXELS = "200000000"
SIDECARS = [".DS_Store", "Thumbs.db", "desktop.ini", "IMG_0001.json", "notes.txt", "IMG_0001.xmp", "IMG_0001.AAE",
            ".hidden/photo.png"]
SKIPPED = {  # file in train/alpha -> what the reason it is skipped for says, with the default settings
    "scan.pdf": "PDF: export the pages as images",
    "data.xyz": "unsupported file type .xyz",
    "huge_scan.png": "--max-pixels",
    "gone.jpg": "No such file",
    NON_UTF8_BROKEN: "not an image",
}
USED = ["phone.heic", "phone.avif", "scan.jp2", NON_UTF8, "more/000.jpg", "more/001.png"]  # in train/alpha
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


def escaped(path: Path) -> str:
    """How stderr shows a name that is not UTF-8 (Python's backslashreplace)."""
    return str(path).encode("utf-8", "backslashreplace").decode()


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python engine.py ARGS`, its output decoded as the OS decodes file names, so that any bytes survive."""
    result = subprocess.run([sys.executable, str(ENGINE), *map(str, args)], cwd=ROOT, capture_output=True,
                            timeout=300)
    return subprocess.CompletedProcess(result.args, result.returncode, os.fsdecode(result.stdout),
                                       os.fsdecode(result.stderr))


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, encoding_errors="surrogateescape", keep_default_na=False)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@dataclass
class Folder:
    data: Path
    alpha: Path  # data/train/alpha, where the odd files are
    copy: Path  # data/test/alpha/copy.jpg: the same bytes as alpha/000.jpg


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Folder:
    """train/ + test/; train/beta and train/alpha/more link to folders elsewhere; train/alpha holds the rest."""
    root = tmp_path_factory.mktemp("real_world")
    data, outside = root / "data", make_image_folder(root / "outside", ("beta", "more"), per_class=4, seed=2)
    alpha = make_image_folder(data / "train", ("alpha",), per_class=6) / "alpha"
    (data / "train" / "beta").symlink_to(outside / "beta", target_is_directory=True)
    (alpha / "more").symlink_to(outside / "more", target_is_directory=True)
    (alpha / "loop").symlink_to(".", target_is_directory=True)  # alpha/loop/loop/... forever, if followed
    (alpha / "gone.jpg").symlink_to(root / "deleted.jpg")
    make_image_folder(data / "test", ("alpha", "beta"), per_class=2, seed=1)
    write(alpha / "phone.heic", rotated_photo("HEIF"))
    write(alpha / "phone.avif", rotated_photo("AVIF"))
    write(alpha / "scan.jp2", encode(sample_rgb(3), "JPEG2000"))
    write(alpha / NON_UTF8, encode(sample_rgb(4), "PNG"))
    write(alpha / NON_UTF8_BROKEN, b"not a jpeg")
    write(alpha / "huge_scan.png", constant_png(*HUGE_SIDES))
    write(alpha / "scan.pdf", b"%PDF-1.4\n%%EOF\n")
    write(alpha / "data.xyz", b"?")
    for name in SIDECARS:
        write(alpha / name, b"sidecar")
    copy = Path(shutil.copyfile(alpha / "000.jpg", data / "test" / "alpha" / "copy.jpg"))
    return Folder(data, alpha, copy)


@dataclass
class Run:
    result: subprocess.CompletedProcess
    out: Path
    split: pd.DataFrame
    metrics: dict


def finished(result: subprocess.CompletedProcess, out: Path) -> Run:
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"{result.stdout}\n{result.stderr}"
    assert not (out / LOCK_NAME).exists()
    return Run(result, out, read_csv(out / "split.csv"), json.loads((out / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def default_run(folder, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("default_run")
    return finished(run_cli("train", "--data-dir", folder.data, "--output-dir", out, *FAST), out)


def reasons(run: Run) -> dict[str, str]:
    return dict(zip(run.split.path, run.split.skipped))


# --- one folder of everything, trained on with the defaults ---------------------------------------------------

@pytest.mark.parametrize("name", USED)
def test_phone_photos_scans_linked_folders_and_odd_names_are_used(folder, default_run, name):
    path = str(folder.alpha / name)
    assert reasons(default_run).get(path) == "", f"{name}: {reasons(default_run).get(path, 'not indexed')}"
    assert path not in default_run.metrics["dataset"]["skipped"]


def test_a_symlinked_class_folder_is_followed(folder, default_run):
    beta = default_run.split[(default_run.split.label == "beta") & (default_run.split.split == "train")]
    assert sorted(Path(path).name for path in beta.path) == ["000.jpg", "001.png", "002.jpg", "003.png"]
    assert all(path.startswith(str(folder.data / "train" / "beta")) for path in beta.path)


@pytest.mark.parametrize("name", SKIPPED)
def test_files_that_cannot_be_used_are_named_with_the_reason_and_counted(folder, default_run, name):
    path = str(folder.alpha / name)
    assert SKIPPED[name] in reasons(default_run)[path]  # split.csv
    assert SKIPPED[name] in default_run.metrics["dataset"]["skipped"][path]
    assert escaped(path) in default_run.result.stderr


def test_skipped_count_is_every_file_that_could_not_be_used(default_run):
    assert default_run.metrics["dataset"]["skipped_count"] == len(SKIPPED)
    assert f"{len(SKIPPED)} skipped" in default_run.result.stderr


def test_hidden_and_sidecar_files_are_passed_over_in_one_line(folder, default_run):
    summary = [line for line in default_run.result.stderr.splitlines() if "hidden or sidecar" in line]
    assert len(summary) == 1 and f"passed over {len(SIDECARS)} " in summary[0], default_run.result.stderr
    output = default_run.result.stdout + default_run.result.stderr
    assert not [name for name in SIDECARS if Path(name).name in output]
    assert not [path for path in default_run.split.path if Path(path).name in map(str, SIDECARS)]


def test_a_symlink_loop_is_named_once_and_not_followed(folder, default_run):
    warnings = [line for line in default_run.result.stderr.splitlines() if "loop" in line]
    assert len(warnings) == 1 and str(folder.alpha / "loop") in warnings[0], default_run.result.stderr
    assert not default_run.split.path.str.contains("/loop/").any()


def test_duplicates_across_splits_are_reported_and_both_kept_by_default(folder, default_run):
    original = str(folder.alpha / "000.jpg")
    assert default_run.split.set_index("path").duplicate_of.fillna("")[str(folder.copy)] == original
    assert [line for line in default_run.result.stderr.splitlines()
            if str(folder.copy) in line and original in line and "--dedupe" in line]
    assert reasons(default_run)[str(folder.copy)] == ""  # still tested on, as asked
    assert dict(zip(default_run.split.path, default_run.split.duplicate_of))[str(folder.copy)] == original


def test_a_non_utf8_name_survives_metrics_and_is_named_in_warnings(folder, default_run):
    text = (default_run.out / "metrics.json").read_text()
    assert text.isascii() and str(folder.alpha / NON_UTF8_BROKEN) in json.loads(text)["dataset"]["skipped"]
    assert escaped(folder.alpha / NON_UTF8_BROKEN) in default_run.result.stderr


def test_predict_csv_keeps_non_utf8_names_byte_for_byte(folder, default_run, tmp_path):
    good, broken, huge = folder.alpha / NON_UTF8, folder.alpha / NON_UTF8_BROKEN, folder.alpha / "huge_scan.png"
    csv = tmp_path / "predictions.csv"
    result = run_cli("predict", good, broken, huge, "--model", default_run.out / "model.pt", "--csv", csv,
                     "--device", "cpu")
    assert_user_error(result)  # two of the three could not be classified
    assert result.stdout.splitlines()[0].split("\t")[0] == str(good)  # the name's own bytes on stdout
    assert escaped(broken) in result.stderr and "--max-pixels" in result.stderr
    table = read_csv(csv)
    assert list(table.input) == [str(good), str(broken), str(huge)]
    assert list(table.error != "") == [False, True, True]
    assert os.fsencode(str(good)) in csv.read_bytes()


# --- the same folder with --max-pixels raised and --dedupe, a dead run's lock in the output folder --------------

def test_raised_max_pixels_and_dedupe(cli, folder, tmp_path):
    out = write(tmp_path / "out" / LOCK_NAME, f"PID {dead_pid()} on a-host\n".encode()).parent
    run = finished(cli("train", "--data-dir", folder.data, "--output-dir", out, *FAST,
                       "--max-pixels", RAISED_MAX_PIXELS, "--dedupe"), out)
    assert "took over the lock" in run.result.stderr  # of the killed run: its process is gone
    huge, original = str(folder.alpha / "huge_scan.png"), str(folder.alpha / "000.jpg")
    assert reasons(run)[huge] == ""  # decoded
    assert reasons(run)[str(folder.copy)] == f"duplicate of {original}"
    assert run.metrics["dataset"]["skipped"][str(folder.copy)] == f"duplicate of {original}"
    assert run.metrics["dataset"]["duplicates"] == {str(folder.copy): original}
    assert reasons(run)[original] == ""  # the training copy is kept
    assert run.metrics["config"]["max_pixels"] == int(RAISED_MAX_PIXELS) and run.metrics["config"]["dedupe"]


def test_predict_and_evaluate_take_max_pixels(cli, folder, default_run, tmp_path):
    huge, model = folder.alpha / "huge_scan.png", default_run.out / "model.pt"
    result = cli("predict", huge, "--model", model, "--device", "cpu", "--max-pixels", RAISED_MAX_PIXELS)
    assert result.returncode == 0 and result.stdout.startswith(f"{huge}\t"), result.stderr
    result = cli("evaluate", folder.data / "train", "--model", model, "--device", "cpu", "--output-dir", tmp_path,
                 "--max-pixels", RAISED_MAX_PIXELS)
    assert result.returncode == 0, result.stderr
    skipped = json.loads((tmp_path / "metrics.json").read_text())["skipped"]
    assert set(skipped) == {str(folder.alpha / name) for name in SKIPPED if name != "huge_scan.png"}
    assert_user_error(cli("predict", huge, "--model", model, "--max-pixels", "0"), "--max-pixels")


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


# --- duplicates -----------------------------------------------------------------------------------------------

def test_only_same_bytes_across_the_splits_are_duplicates(tmp_path):
    files = {"train_a": b"x" * 100, "train_b": b"x" * 100, "test_same": b"x" * 100, "test_same_size": b"y" * 100,
             "val_same": b"x" * 100, "test_other": b"z" * 7}
    index = pd.DataFrame({"path": [str(write(tmp_path / name, data)) for name, data in files.items()],
                          "split": [name.split("_")[0] for name in files]})
    assert held_out_copies(index) == {str(tmp_path / "test_same"): str(tmp_path / "train_a"),
                                      str(tmp_path / "val_same"): str(tmp_path / "train_a")}
