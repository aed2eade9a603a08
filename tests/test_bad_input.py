"""Bad input: unusable files are skipped and reported, user mistakes end in one line and exit 2, nothing is lost.

One messy data folder (every kind of bad, odd and junk file mixed into three good classes) is trained on
once, and each case is checked against that one run's stdout, stderr, metrics.json and split.csv.
The exit-2 cases call engine.main() in this process (they fail before any heavy work, so a fresh
interpreter per case would only add seconds of imports); a few representatives, the predict mix and
Ctrl-C go through a real `python engine.py` subprocess.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import ENGINE, FAST, interrupted, make_image_folder, run_engine

CLASSES = ["alpha", "beta", "gamma"]


# --- image bytes -----------------------------------------------------------------------------------------

def sample_rgb(seed: int = 1, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    """Noise with a bright rectangle: a small, valid, non-square RGB image."""
    image = np.random.default_rng(seed).integers(0, 120, (*size, 3), dtype=np.uint8)
    image[5:25, 8:30] = (230, 180, 40)
    return image


def encode(image: Image.Image | np.ndarray, format: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def constant_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG of width x height black pixels; constant rows compress ~1000:1 (20000^2 -> ~50 kB)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is overwritten (CRC and zlib stream both broken)."""
    data = bytearray(encode(sample_rgb(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start:start + 200] = np.random.default_rng(7).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(sample_rgb(), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.fromarray(sample_rgb(seed)).convert("P") for seed in (1, 2, 3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def half(data: bytes) -> bytes:
    return data[:len(data) // 2]


# Files that must be skipped with a warning naming them: path in the data folder -> (bytes, reason pattern).
# The pattern is the reason the run records for that file (metrics.json dataset.skipped, and its warning):
# a file skipped for another reason (a decoder that fails earlier, a check that no longer runs) fails.
NOT_AN_IMAGE = r"^not an image, or corrupt$"  # Pillow cannot even read its header
TOO_LARGE = r"is over 89478485 pixels, too large to decode safely \(raise --max-pixels to decode it\)$"
SKIPPED = {
    "alpha/empty.jpg": (lambda: b"", r"^empty file$"),
    "alpha/truncated.jpg": (lambda: half(encode(sample_rgb(), "JPEG")),
                            r"^truncated JPEG \(no end-of-image marker\)$"),  # OpenCV would fill it with grey
    "beta/truncated.png": (lambda: half(encode(sample_rgb(), "PNG")),
                           r"^cannot be decoded \(image file is truncated\)$"),  # OpenCV fails, then Pillow
    "beta/corrupt.png": (corrupt_png, r"^cannot be decoded \(broken data stream"),
    "gamma/random_bytes.png": (lambda: np.random.default_rng(3).integers(0, 256, 3000, np.uint8).tobytes(),
                               NOT_AN_IMAGE),
    "gamma/notes.jpg": (lambda: b"shopping list: milk, bread\n", NOT_AN_IMAGE),
    "alpha/report.png": (lambda: b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", NOT_AN_IMAGE),
    "beta/huge_20000x20000.png": (lambda: constant_png(20000, 20000), r"^the image " + TOO_LARGE),  # Pillow's bomb
    "gamma/huge_10000x9500.png": (lambda: constant_png(10000, 9500), r"^10000x9500 " + TOO_LARGE),  # MAX_PIXELS
    "alpha/one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
                            r"^1x1 is too small to classify$"),
}

# Odd but valid images that must be used: path -> bytes.
USED = {
    "alpha/gray.png": lambda: encode(Image.fromarray(sample_rgb()).convert("L"), "PNG"),
    "beta/gray.jpg": lambda: encode(Image.fromarray(sample_rgb()).convert("L"), "JPEG"),
    "gamma/rgba.png": lambda: encode(Image.fromarray(sample_rgb()).convert("RGBA"), "PNG"),
    "alpha/gray_alpha.png": lambda: encode(Image.fromarray(sample_rgb()).convert("LA"), "PNG"),
    "beta/rgb_16bit.png": lambda: cv2.imencode(".png", sample_rgb().astype(np.uint16) * 257)[1].tobytes(),
    "gamma/gray_16bit.png": lambda: encode(sample_rgb()[..., 0].astype(np.uint16) * 257, "PNG"),
    "alpha/palette.png": lambda: encode(Image.fromarray(sample_rgb()).convert("P"), "PNG"),
    "beta/palette_transparent.png": lambda: encode(Image.fromarray(sample_rgb()).convert("P"), "PNG", transparency=0),
    "gamma/cmyk.jpg": lambda: encode(Image.fromarray(sample_rgb()).convert("CMYK"), "JPEG"),
    "alpha/exif_rotated.jpg": exif_rotated_jpeg,
    "beta/still.gif": lambda: encode(Image.fromarray(sample_rgb()).convert("P"), "GIF"),
    "gamma/animated.gif": animated_gif,
    "alpha/float32.tif": lambda: encode(sample_rgb()[..., 0].astype(np.float32), "TIFF"),  # OpenCV can't: Pillow
    "beta/UPPER.JPG": lambda: encode(sample_rgb(), "JPEG"),
    "gamma/UPPER.PNG": lambda: encode(sample_rgb(), "PNG"),
    "alpha/Mixed.JpEg": lambda: encode(sample_rgb(), "JPEG"),
    "beta/png_named.jpg": lambda: encode(sample_rgb(), "PNG"),
    "gamma/name with spaces.png": lambda: encode(sample_rgb(), "PNG"),
    "alpha/ünïcødé 文書.jpg": lambda: encode(sample_rgb(), "JPEG"),
    "beta/bitmap.bmp": lambda: encode(sample_rgb(), "BMP"),
    "gamma/image.webp": lambda: encode(sample_rgb(), "WEBP"),
    "alpha/image.tiff": lambda: encode(sample_rgb(), "TIFF"),
    "beta/progressive.jpg": lambda: encode(sample_rgb(), "JPEG", progressive=True),
    "gamma/sub folder/deeper/nested.png": lambda: encode(sample_rgb(), "PNG"),
}

# Hidden files and system junk, to be ignored silently. Several would be skipped (or become a class) if seen.
JUNK = {
    ".DS_Store": lambda: b"\x00\x00\x00\x01Bud1" + bytes(64),
    "Thumbs.db": lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64),
    "alpha/.DS_Store": lambda: b"\x00\x00\x00\x01Bud1" + bytes(64),
    "alpha/._000.jpg": lambda: b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64),  # AppleDouble
    "beta/Thumbs.db": lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64),
    "beta/.hidden.png": lambda: b"not really a png",
    "gamma/desktop.ini": lambda: b"[.ShellClassInfo]\r\nIconResource=x\r\n",
    "gamma/.thumbnails/thumb.jpg": lambda: b"junk",
    ".Trash-1000/files/photo.png": lambda: encode(sample_rgb(), "PNG"),
    "delta/Thumbs.db": lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64),  # delta/ holds no images
}
EMPTY_CLASSES = ["delta", "epsilon"]  # delta/ has only Thumbs.db, epsilon/ nothing


def write_files(root: Path, files: dict) -> None:
    for relative, make in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make[0]() if isinstance(make, tuple) else make())


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder` (hidden ones included): (size, mtime, sha256) for files."""
    state = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if path.is_dir():
            state[relative] = ("dir",)
        else:
            state[relative] = (path.stat().st_size, path.stat().st_mtime_ns,
                               hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def fake_previous_outputs(folder: Path) -> dict[str, tuple]:
    """An output folder as an earlier run left it (contents are placeholders); returns its snapshot."""
    folder.mkdir(parents=True)
    for name in ("model.pt", "metrics.json", "history.csv", "split.csv", "loss_curve.png", "confusion_matrix.png"):
        (folder / name).write_bytes(f"previous run's {name}\n".encode())
    return snapshot(folder)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines (ours start with it; argparse's start with `engine.py train: error: `)."""
    return [line for line in stderr.splitlines() if re.match(r"^(engine\.py[\w\- ]*: )?error: ", line)]


def assert_user_error(result: subprocess.CompletedProcess, *named: str) -> None:
    """Exit status 2, one `error:` line on stderr naming each of `named`, and no traceback."""
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, report
    assert result.returncode == 2, report
    lines = error_lines(result.stderr)
    assert len(lines) == 1, report
    for text in named:
        assert text in lines[0], f"{text!r} not named in the error line\n{report}"


# --- running the CLI -------------------------------------------------------------------------------------

@dataclass
class Run:
    data: Path
    out: Path
    result: subprocess.CompletedProcess
    metrics: dict
    indexed: set[str]  # paths in split.csv
    before: dict
    after: dict


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Run:
    """Three good classes plus every bad, odd and junk file; trained on once with FAST settings."""
    data = make_image_folder(tmp_path_factory.mktemp("messy") / "data", tuple(CLASSES), per_class=8)
    write_files(data, SKIPPED)
    write_files(data, USED)
    write_files(data, JUNK)
    for name in EMPTY_CLASSES:
        (data / name).mkdir(exist_ok=True)
    out = tmp_path_factory.mktemp("messy_output")
    before = snapshot(data)
    result = run_engine("train", "--data-dir", data, "--output-dir", out, *FAST)
    after = snapshot(data)
    assert result.returncode == 0, f"the messy run failed\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    metrics = json.loads((out / "metrics.json").read_text())
    indexed = set(pd.read_csv(out / "split.csv").path)
    return Run(data, out, result, metrics, indexed, before, after)


# --- skipped, used, ignored: one messy run ----------------------------------------------------------------

def test_messy_run_trains_without_traceback(messy):
    assert "Traceback" not in messy.result.stderr
    assert not error_lines(messy.result.stderr)
    assert (messy.out / "model.pt").is_file()
    assert messy.metrics["dataset"]["classes"] == CLASSES


@pytest.mark.parametrize("relative", SKIPPED)
def test_bad_file_is_skipped_with_a_warning_and_counted(messy, relative):
    path = str(messy.data / relative)
    skipped = messy.metrics["dataset"]["skipped"]
    assert path in skipped, f"{relative} not in metrics.json dataset.skipped: {sorted(skipped)}"
    assert re.search(SKIPPED[relative][1], skipped[path]), skipped[path]
    warnings = [line for line in messy.result.stderr.splitlines() if path in line]
    assert warnings and all("warning" in line.lower() for line in warnings), messy.result.stderr
    assert any(line.endswith(f"{path}: {skipped[path]}") for line in warnings), warnings  # the same reason


def test_skipped_count_is_exactly_the_bad_files(messy):
    dataset = messy.metrics["dataset"]
    assert set(dataset["skipped"]) == {str(messy.data / relative) for relative in SKIPPED}
    assert dataset["skipped_count"] == len(SKIPPED)


@pytest.mark.parametrize("relative", USED)
def test_odd_but_valid_image_is_used(messy, relative):
    path = str(messy.data / relative)
    assert path in messy.indexed, f"{relative} was not indexed"
    assert path not in messy.metrics["dataset"]["skipped"], messy.metrics["dataset"]["skipped"].get(path)
    # never warned about, but as a copy: several of these files are the same bytes, split between train and test
    assert not [line for line in messy.result.stderr.splitlines() if path in line and "exact copy" not in line]


def test_every_good_and_odd_image_is_counted(messy):
    counts = messy.metrics["dataset"]["counts"]
    assert sum(n for per_split in counts.values() for n in per_split.values()) == 8 * len(CLASSES) + len(USED)


@pytest.mark.parametrize("relative", JUNK)
def test_hidden_and_system_files_are_ignored_silently(messy, relative):
    path = str(messy.data / relative)
    assert path not in messy.indexed
    assert path not in messy.metrics["dataset"]["skipped"]
    name = Path(relative).name
    assert name not in messy.result.stderr and name not in messy.result.stdout


@pytest.mark.parametrize("name", EMPTY_CLASSES)
def test_empty_class_folder_is_reported_and_left_out(messy, name):
    folder = str(messy.data / name)
    assert any(folder in line and "warning" in line.lower() for line in messy.result.stderr.splitlines()), \
        messy.result.stderr
    assert name not in messy.metrics["dataset"]["classes"]
    assert not any(Path(path).parent.name == name for path in messy.indexed)


def test_training_never_writes_into_the_data_folder(messy):
    assert messy.after == messy.before


# --- the same rules, in-process where a subprocess can't reach ---------------------------------------------

def test_pixel_cap_is_max_pixels(tmp_path, monkeypatch):
    from MLPipeline.extras import Data, Files
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    small.write_bytes(encode(sample_rgb(size=(20, 20)), "PNG"))  # 400 pixels
    large.write_bytes(encode(sample_rgb(size=(40, 48)), "PNG"))  # 1920 pixels
    monkeypatch.setattr(Files, "MAX_PIXELS", 1000)
    images, skipped = Data.load_images([str(small), str(large)], 32)
    assert list(skipped) == [str(large)] and "pixels" in skipped[str(large)]
    assert images.shape == (1, 32, 32, 3)


def test_pillow_decodes_what_opencv_cannot(tmp_path, monkeypatch):
    from MLPipeline.extras import Files
    gif = tmp_path / "still.gif"
    gif.write_bytes(USED["beta/still.gif"]())
    monkeypatch.setattr(Files.cv2, "imdecode", lambda *args, **kwargs: None)
    image = Files.read_image(gif)
    expected = np.asarray(Image.open(gif).convert("RGB"))
    assert image.dtype == np.uint8 and np.array_equal(image, expected)


def test_exif_orientation_is_applied(tmp_path):
    from MLPipeline.extras.Files import read_image
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated_jpeg())
    stored = sample_rgb()
    assert stored.shape == (40, 48, 3) and (stored[5:25, 8:30] == (230, 180, 40)).all()  # the marker block
    image = read_image(path).astype(int)
    assert image.shape == (48, 40, 3)
    # Orientation 6: displayed = stored turned 90 degrees clockwise, so the marker at stored rows 5-24, columns
    # 8-29 shows at rows 8-29, columns 15-34 (turned the other way, or mirrored, it lands elsewhere).
    marker = image[10:28, 17:33].reshape(-1, 3)  # inside it, away from JPEG's blurred edges
    assert (np.abs(marker - (230, 180, 40)) < 40).all(), marker.mean(0)
    for corner in (image[:6, :6], image[:6, -6:], image[-6:, :6], image[-6:, -6:]):  # noise below 120
        assert corner[..., 0].mean() < 120
    clockwise = np.abs(image - np.rot90(stored, -1)).mean()
    wrong = {"counter-clockwise": np.rot90(stored, 1), "transposed": stored.transpose(1, 0, 2),
             "anti-transposed": np.rot90(stored, 2).transpose(1, 0, 2)}
    for name, other in wrong.items():  # JPEG noise is ~20 off the right one, >45 off the wrong ones
        assert clockwise < 0.6 * np.abs(image - other).mean(), name


# --- user mistakes: exit 2, one line, no traceback, previous outputs untouched ----------------------------

def copy_classes(source: Path, target: Path, classes: list[str]) -> Path:
    for name in classes:
        shutil.copytree(source / name, target / name)
    return target


def only_junk_folder(root: Path) -> Path:
    write_files(root, {"a/notes.txt": lambda: b"x", "b/.DS_Store": lambda: b"x", "c/Thumbs.db": lambda: b"x",
                       ".hidden/photo.png": lambda: encode(sample_rgb(), "PNG")})
    return root


def one_usable_class(root: Path, tiny: Path) -> Path:
    copy_classes(tiny, root, ["alpha"])
    write_files(root, {f"beta/{i}.jpg": lambda: b"not an image" for i in range(3)})
    return root


def one_image_class(root: Path, tiny: Path) -> Path:
    copy_classes(tiny, root, ["alpha", "beta"])
    write_files(root, {"lonely/only.png": lambda: encode(sample_rgb(), "PNG")})
    return root


def empty_folder(root: Path) -> Path:
    root.mkdir()
    return root


# name -> build(tmp_path, tiny_data) -> (extra train args after FAST, texts the error line must contain)
TRAIN_ERRORS = {
    "data-dir-missing": lambda tmp, tiny: (["--data-dir", tmp / "no such folder"], [str(tmp / "no such folder")]),
    "data-dir-is-a-file": lambda tmp, tiny: (["--data-dir", tiny / "alpha" / "000.jpg"], ["000.jpg"]),
    "no-images-empty-folder": lambda tmp, tiny: (["--data-dir", empty_folder(tmp / "d")], [str(tmp / "d")]),
    "no-images-only-junk": lambda tmp, tiny: (["--data-dir", only_junk_folder(tmp / "d")], [str(tmp / "d")]),
    "one-class": lambda tmp, tiny: (["--data-dir", copy_classes(tiny, tmp / "d", ["alpha"])], ["class"]),
    "one-usable-class": lambda tmp, tiny: (["--data-dir", one_usable_class(tmp / "d", tiny)], ["beta"]),
    "class-too-small-to-split": lambda tmp, tiny: (["--data-dir", one_image_class(tmp / "d", tiny)], ["lonely"]),
    "epochs-0": lambda tmp, tiny: (["--data-dir", tiny, "--epochs", "0"], ["--epochs"]),
    "epochs-negative": lambda tmp, tiny: (["--data-dir", tiny, "--epochs", "-3"], ["--epochs"]),
    "epochs-abc": lambda tmp, tiny: (["--data-dir", tiny, "--epochs", "abc"], ["--epochs", "abc"]),
    "batch-size-0": lambda tmp, tiny: (["--data-dir", tiny, "--batch-size", "0"], ["--batch-size"]),
    "test-size-0": lambda tmp, tiny: (["--data-dir", tiny, "--test-size", "0"], ["--test-size"]),
    "test-size-1": lambda tmp, tiny: (["--data-dir", tiny, "--test-size", "1"], ["--test-size"]),
    "test-size-1.5": lambda tmp, tiny: (["--data-dir", tiny, "--test-size", "1.5"], ["--test-size"]),
    "img-size-8": lambda tmp, tiny: (["--data-dir", tiny, "--img-size", "8"], ["--img-size"]),
    "lr-0": lambda tmp, tiny: (["--data-dir", tiny, "--lr", "0"], ["--lr"]),
    "lr-nan": lambda tmp, tiny: (["--data-dir", tiny, "--lr", "nan"], ["--lr"]),
    "lr-inf": lambda tmp, tiny: (["--data-dir", tiny, "--lr", "inf"], ["--lr"]),
    "lr-1e300": lambda tmp, tiny: (["--data-dir", tiny, "--lr", "1e300"], ["--lr"]),
    "seed-past-2-to-the-64": lambda tmp, tiny: (["--data-dir", tiny, "--seed", str(2**64)], ["--seed"]),
    "device-tpu": lambda tmp, tiny: (["--data-dir", tiny, "--device", "tpu"], ["tpu"]),
    "device-cuda-without-gpu": lambda tmp, tiny: (["--data-dir", tiny, "--device", "cuda"], ["cuda"]),
    "weights-file-missing": lambda tmp, tiny: (["--data-dir", tiny, "--weights", tmp / "no.pth"], ["no.pth"]),
    "weights-file-random-bytes": lambda tmp, tiny: (
        ["--data-dir", tiny, "--weights", write_bytes(tmp / "w.pth", bytes(range(256)) * 8)], ["w.pth"]),
    "weights-file-foreign-dict": lambda tmp, tiny: (
        ["--data-dir", tiny, "--weights", torch_save(tmp / "w.pth", {"a": 1})], ["w.pth"]),
    "weights-file-text": lambda tmp, tiny: (
        ["--data-dir", tiny, "--weights", write_bytes(tmp / "w.pth", b"hello world, not weights\n")], ["w.pth"]),
    "seed-negative": lambda tmp, tiny: (["--data-dir", tiny, "--seed", "-1"], ["--seed"]),
}
NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def cases(names) -> list:
    """Parameters, with the 'no GPU' cases skipped on a machine that has one."""
    return [pytest.param(name, marks=[NEEDS_NO_GPU] if "cuda" in name else []) for name in names]


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def torch_save(path: Path, value) -> Path:
    torch.save(value, path)
    return path


@pytest.mark.parametrize("case", cases(TRAIN_ERRORS))
def test_train_user_error_exits_2_and_leaves_previous_outputs(cli, case, tmp_path, tiny_data):
    args, named = TRAIN_ERRORS[case](tmp_path, tiny_data)
    output = tmp_path / "output"
    previous = fake_previous_outputs(output)
    result = cli("train", "--output-dir", output, *FAST, *args)
    assert_user_error(result, *named)
    assert snapshot(output) == previous


# --- the real CLI: a few representatives in a fresh interpreter --------------------------------------------

def test_cli_bad_flag_value_exits_2(tiny_data, tmp_path):
    result = run_engine("train", "--data-dir", tiny_data, "--output-dir", tmp_path / "out", *FAST,
                        "--epochs", "abc")
    assert_user_error(result, "--epochs")
    assert not (tmp_path / "out").exists()


def test_cli_failed_run_says_so_before_touching_previous_outputs(messy, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(messy.out, output)
    before = snapshot(output)
    result = run_engine("train", "--data-dir", tmp_path / "missing", "--output-dir", output, *FAST)
    assert_user_error(result, str(tmp_path / "missing"))
    assert snapshot(output) == before


# --- predict / evaluate with bad model files and paths -----------------------------------------------------

class NotAModel:
    """Pickled by torch.save as a Python object: must be refused, never unpickled."""


@pytest.fixture(scope="module")
def model_files(messy, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("model_files")
    real = messy.out / "model.pt"
    checkpoint = torch.load(real, weights_only=True)
    import torchvision
    files = {
        "missing": folder / "missing.pt",
        "empty": write_bytes(folder / "empty.pt", b""),
        "random-bytes": write_bytes(folder / "random.pt", np.random.default_rng(0).bytes(5000)),
        "random-bytes-starting-with-dot": write_bytes(folder / "dot.pt", b"." + np.random.default_rng(0).bytes(5000)),
        "text-file": write_bytes(folder / "notes.pt", b"hello world, not a model\n"),
        "truncated-checkpoint": write_bytes(folder / "truncated.pt", real.read_bytes()[:200_000]),
        "plain-dict": torch_save(folder / "plain_dict.pt", {"a": 1}),
        "list": torch_save(folder / "list.pt", [1, 2, 3]),
        "python-object": torch_save(folder / "object.pt", NotAModel()),
        "resnet18-state-dict": torch_save(folder / "resnet18.pth", torchvision.models.resnet18().state_dict()),
        "classes-do-not-fit-weights": torch_save(folder / "five_classes.pt",
                                                 {**checkpoint, "classes": ["a", "b", "c", "d", "e"]}),
    }
    return files


MODEL_CASES = ["missing", "empty", "random-bytes", "random-bytes-starting-with-dot", "text-file",
               "truncated-checkpoint", "plain-dict", "list", "python-object", "resnet18-state-dict",
               "classes-do-not-fit-weights"]


@pytest.mark.parametrize("case", cases(MODEL_CASES))
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_bad_model_file_exits_2(cli, model_files, command, case, tiny_data, tmp_path):
    model = model_files[case]
    target = tiny_data / "alpha" / "000.jpg" if command == "predict" else tiny_data
    extra = ["--output-dir", tmp_path / "evaluation"] if command == "evaluate" else []
    result = cli(command, target, "--model", model, "--device", "cpu", *extra)
    assert_user_error(result, str(model))
    assert result.stdout.strip() == ""
    assert not (tmp_path / "evaluation").exists()


def test_predict_mix_of_good_missing_and_corrupt_paths(messy, tiny_data, tmp_path):
    good, missing, broken = tiny_data / "beta" / "001.png", tmp_path / "missing photo.jpg", tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    result = run_engine("predict", good, missing, broken, "--model", messy.out / "model.pt", "--device", "cpu",
                        "--no-review")
    assert_user_error(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}\t"), result.stdout
    assert lines[0].split("\t")[1].split()[0] in CLASSES
    assert str(missing) in result.stderr and str(broken) in result.stderr
    assert str(missing) not in result.stdout and str(broken) not in result.stdout


@pytest.mark.parametrize("case", ["missing-file", "empty-folder"])
def test_predict_nothing_to_classify_exits_2(cli, messy, case, tmp_path):
    target = tmp_path / "missing.jpg" if case == "missing-file" else empty_folder(tmp_path / "empty")
    result = cli("predict", target, "--model", messy.out / "model.pt", "--device", "cpu")
    assert_user_error(result)
    assert str(target) in result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("case", ["missing", "a-file", "no-images"])
def test_evaluate_bad_data_dir_exits_2(cli, messy, case, tmp_path, tiny_data):
    data = {"missing": tmp_path / "missing", "a-file": tiny_data / "alpha" / "000.jpg",
            "no-images": only_junk_folder(tmp_path / "junk")}[case]
    result = cli("evaluate", data, "--model", messy.out / "model.pt", "--device", "cpu",
                 "--output-dir", tmp_path / "evaluation")
    assert_user_error(result, str(data))
    assert not (tmp_path / "evaluation").exists()


def test_predict_csv_path_that_is_a_folder_exits_2(cli, messy, tiny_data, tmp_path):
    result = cli("predict", tiny_data / "alpha" / "000.jpg", "--model", messy.out / "model.pt", "--device", "cpu",
                 "--csv", tmp_path)
    assert_user_error(result, str(tmp_path))


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_output_dir_that_is_a_file_exits_2_before_any_work(cli, messy, command, tiny_data, tmp_path):
    output = write_bytes(tmp_path / "output", b"a file the user keeps here\n")
    if command == "train":
        result = cli("train", "--data-dir", tiny_data, "--output-dir", output, *FAST)
    else:
        result = cli("evaluate", tiny_data, "--model", messy.out / "model.pt", "--device", "cpu",
                     "--output-dir", output)
    assert_user_error(result, str(output))
    assert output.read_bytes() == b"a file the user keeps here\n"
    assert "epoch" not in result.stdout


@NEEDS_NO_GPU
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_device_cuda_without_gpu_exits_2(cli, messy, command, tiny_data, tmp_path):
    target = tiny_data / "alpha" / "000.jpg" if command == "predict" else tiny_data
    extra = ["--output-dir", tmp_path / "evaluation"] if command == "evaluate" else []
    result = cli(command, target, "--model", messy.out / "model.pt", "--device", "cuda", *extra)
    assert_user_error(result, "cuda")


# --- nothing lost -----------------------------------------------------------------------------------------

def test_demo_generator_refuses_a_folder_of_images(cli, tiny_data, tmp_path):
    users_images = copy_classes(tiny_data, tmp_path / "my photos", CLASSES)
    before = snapshot(users_images)
    result = cli("make-demo-data", "--out", users_images, "--per-class", "1")
    assert_user_error(result, str(users_images))
    assert snapshot(users_images) == before


def test_model_is_written_atomically(tmp_path, monkeypatch):
    from MLPipeline.ResNet_Model import save_checkpoint
    model = tmp_path / "model.pt"
    model.write_bytes(b"the previous model")

    def interrupted_save(value, path, *args, **kwargs):
        Path(path).write_bytes(b"half a mod")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, {"format": "x"})
    assert model.read_bytes() == b"the previous model"
    assert [path.name for path in tmp_path.iterdir()] == ["model.pt"]


def test_ctrl_c_during_training_keeps_the_previous_model(messy, tmp_path):
    data = make_image_folder(tmp_path / "data", tuple(CLASSES), per_class=14, seed=5)
    output = tmp_path / "output"
    shutil.copytree(messy.out, output)
    before = snapshot(output)
    command = [ENGINE, "train", "--data-dir", data, "--output-dir", output, *FAST, "--epochs", "1000",
               "--no-feature-cache"]
    status, stderr = interrupted(command, lambda line: re.match(r"epoch \d+/", line) is not None)
    assert "Traceback" not in stderr, stderr
    assert status == 130, f"exit {status}\n{stderr}"
    assert snapshot(output) == before
    assert not [path.name for path in output.iterdir() if path.name.startswith(".")]
    from MLPipeline import load_model
    assert load_model(output / "model.pt", "cpu").classes == CLASSES
