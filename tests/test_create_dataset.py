"""CreateDataset: finding images, splitting them, decoding every kind of file, and the tensors the model gets.

Everything is built in tmp_path from a few tiny images, so the whole file runs in a few seconds.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from MLPipeline import CreateDataset
from MLPipeline.extras import Files
from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Data import build_index, load_images
from MLPipeline.extras.Files import BadImageError, index_folder, load_image, read_image
from MLPipeline.CreateDataset import stratified_split, to_model_input

RED_RGB = (220, 30, 20)


def write_image(path: Path, size: tuple[int, int] = (40, 48), colour=RED_RGB, fmt: str | None = None) -> Path:
    """A solid-colour RGB image of (height, width) = size, written with Pillow (any format, any file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    Image.new("RGB", (width, height), colour).save(path, format=fmt)
    return path


def jpeg_bytes(size: tuple[int, int] = (40, 48), colour=RED_RGB) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size[::-1], colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_classes(root: Path, counts: dict[str, int]) -> Path:
    for label, count in counts.items():
        for i in range(count):
            write_image(root / label / f"{i:03d}.png", size=(8, 8))
    return root


def assert_rgb8(image: np.ndarray) -> None:
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3


# --------------------------------------------------------------------------------------------- finding images

def test_index_folder_classes_labels_and_recursion(tmp_path):
    write_image(tmp_path / "zeta" / "a.jpg")
    write_image(tmp_path / "alpha" / "b.png")
    write_image(tmp_path / "alpha" / "scans" / "2024" / "deep.png")  # nested: still class alpha
    write_image(tmp_path / "mid" / "c.bmp")
    index = index_folder(tmp_path)
    assert list(index.columns[:2]) == ["path", "label"]
    assert sorted(index.label.unique()) == list(dict.fromkeys(index.label))  # rows come class by class, sorted
    assert set(index.label) == {"zeta", "alpha", "mid"}
    by_name = {Path(p).name: label for p, label in zip(index.path, index.label)}
    assert by_name == {"a.jpg": "zeta", "b.png": "alpha", "deep.png": "alpha", "c.bmp": "mid"}
    assert all(Path(p).is_file() for p in index.path)


def test_index_folder_extension_case_hidden_and_non_images(tmp_path):
    cls = tmp_path / "cards"
    kept = [write_image(cls / "upper.JPG", fmt="JPEG"), write_image(cls / "mixed.Png", fmt="PNG"),
            write_image(cls / "jpeg.JpEg", fmt="JPEG"), write_image(cls / "plain.png")]
    write_image(cls / "._upper.jpg", fmt="JPEG")  # macOS resource-fork twin
    write_image(cls / ".hidden" / "secret.png")  # hidden folder inside a class
    write_image(tmp_path / ".hidden_class" / "x.png")  # hidden class folder
    (cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (cls / "notes.txt").write_text("not an image")
    (cls / "noext").write_bytes(jpeg_bytes())
    index = index_folder(tmp_path)
    images = index[index.skipped == ""]
    assert sorted(images.path) == sorted(str(p) for p in kept)
    # a file that is not a supported image is listed, with the reason it is skipped; hidden and sidecar ones are not
    assert dict(zip(index.path, index.skipped)) == {**{str(p): "" for p in kept},
                                                    str(cls / "noext"): "unsupported file type (no extension)"}
    assert set(index.label) == {"cards"}


@pytest.mark.parametrize("junk", [[], ["Thumbs.db", "notes.txt", ".DS_Store"]], ids=["empty", "only-non-images"])
def test_class_folder_without_images_is_left_out_with_a_warning(tmp_path, caplog, junk):
    make_classes(tmp_path, {"alpha": 3, "beta": 3})
    (tmp_path / "ghost").mkdir()
    for name in junk:
        (tmp_path / "ghost" / name).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        index = build_index(tmp_path, seed=0)
    assert set(index.label) == {"alpha", "beta"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("ghost" in message for message in warnings), warnings


def test_build_index_on_shared_tiny_data(tiny_data):
    index = build_index(tiny_data, test_size=0.2, seed=42)
    assert list(index.columns) == ["path", "label", "skipped", "split", "duplicate_of"]
    assert (index.skipped == "").all()
    assert sorted(index.label.unique()) == sorted(p.name for p in tiny_data.iterdir() if p.is_dir())
    assert set(index.split) == {"train", "test"}
    for _, rows in index.groupby("label"):
        assert (rows.split == "test").sum() == max(1, round(0.2 * len(rows)))


# ------------------------------------------------------------------------------------------ stratified split

def test_split_is_seeded(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 10, "c": 10})
    first, again = build_index(tmp_path, seed=7), build_index(tmp_path, seed=7)
    assert first.equals(again)
    other = build_index(tmp_path, seed=8)
    assert sorted(first.path) == sorted(other.path)
    assert set(first.path[first.split == "test"]) != set(other.path[other.split == "test"])


def test_adding_a_class_leaves_the_other_classes_split_alone(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 10})
    before = build_index(tmp_path, seed=7)
    make_classes(tmp_path, {"c": 10})
    after = build_index(tmp_path, seed=7)
    assert set(before.path[before.split == "test"]) <= set(after.path[after.split == "test"])


def test_presplit_layout_names_folders_it_ignores(tmp_path, caplog):
    for split in ("train", "test", "val"):
        make_classes(tmp_path / split, {"a": 2, "b": 2})
    index = build_index(tmp_path)
    assert set(index.split) == {"train", "test"} and not index.path.str.contains("/val/").any()
    assert "val" in caplog.text and "ignored" in caplog.text


@pytest.mark.parametrize("test_size, counts, expected_test", [
    (0.2, {"n2": 2, "n3": 3, "n5": 5, "n7": 7, "n10": 10, "n13": 13}, {"n2": 1, "n3": 1, "n5": 1, "n7": 1,
                                                                      "n10": 2, "n13": 3}),
    (0.5, {"n2": 2, "n4": 4, "n6": 6}, {"n2": 1, "n4": 2, "n6": 3}),
    (0.9, {"n3": 3, "n10": 10}, {"n3": 2, "n10": 9}),  # each class keeps at least one training image
    (0.01, {"n2": 2, "n9": 9}, {"n2": 1, "n9": 1}),  # each class gets at least one test image
])
def test_split_counts_per_class(tmp_path, test_size, counts, expected_test):
    make_classes(tmp_path, counts)
    index = build_index(tmp_path, test_size=test_size, seed=3)
    test_counts = index[index.split == "test"].label.value_counts().to_dict()
    train_counts = index[index.split == "train"].label.value_counts().to_dict()
    assert test_counts == expected_test
    assert train_counts == {label: counts[label] - expected_test[label] for label in counts}


def index_frame(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"/x/{label}/{i}.png", label) for label, count in counts.items() for i in range(count)]
    return pd.DataFrame(rows, columns=["path", "label"])


def test_split_leaves_input_index_alone():
    index = index_frame({"a": 4, "b": 4})
    before = index.copy()
    split = stratified_split(index, 0.25, seed=0)
    assert index.equals(before)
    assert (split.split == "test").sum() == 2


def test_class_with_one_image_cannot_be_split(tmp_path):
    make_classes(tmp_path, {"plenty": 5, "lonely_class": 1})
    with pytest.raises(UserError, match="lonely_class"):
        build_index(tmp_path)


# ------------------------------------------------------------------------------------------ pre-split layouts

@pytest.mark.parametrize("train_name, test_name", [
    ("train", "test"), ("train", "val"), ("Training_data", "Testing_Data"), ("TRAIN", "Val"),
    ("training_DATA", "TESTING_data"),
])
def test_presplit_layout_is_used_as_given(tmp_path, train_name, test_name):
    make_classes(tmp_path / train_name, {"cat": 3, "dog": 4})
    make_classes(tmp_path / test_name, {"cat": 2, "dog": 1})
    index = build_index(tmp_path, test_size=0.5, seed=0)  # test_size must not re-split a pre-split layout
    train_paths = {str(p) for p in (tmp_path / train_name).rglob("*.png")}
    test_paths = {str(p) for p in (tmp_path / test_name).rglob("*.png")}
    assert set(index.path[index.split == "train"]) == train_paths
    assert set(index.path[index.split == "test"]) == test_paths
    assert set(index.label) == {"cat", "dog"}
    for path, label in zip(index.path, index.label):
        assert Path(path).parent.name == label


def test_presplit_test_class_missing_from_train(tmp_path):
    make_classes(tmp_path / "train", {"cat": 3, "dog": 3})
    make_classes(tmp_path / "test", {"cat": 1, "dog": 1, "platypus": 1})
    with pytest.raises(UserError, match="platypus"):
        build_index(tmp_path)


# ---------------------------------------------------------------------------------------------- data errors

def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(UserError, match="does not exist") as error:
        build_index(missing)
    assert str(missing) in str(error.value)


def test_data_dir_is_a_file(tmp_path):
    a_file = write_image(tmp_path / "photo.png")
    with pytest.raises(UserError, match="not a folder") as error:
        build_index(a_file)
    assert str(a_file) in str(error.value)


@pytest.mark.parametrize("layout", ["empty", "empty-classes", "only-loose-images", "non-images"])
def test_no_images(tmp_path, layout):
    if layout == "empty-classes":
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
    elif layout == "only-loose-images":
        write_image(tmp_path / "loose.png")
    elif layout == "non-images":
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no images") as error:
        build_index(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_only_one_class(tmp_path):
    make_classes(tmp_path, {"only": 6})
    with pytest.raises(UserError, match="2 class") as error:
        build_index(tmp_path)
    assert str(tmp_path) in str(error.value)


# ------------------------------------------------------------------------------------------------- decoding

def test_grayscale_png_and_jpeg(tmp_path):
    for name in ("g.png", "g.jpg"):
        Image.new("L", (48, 40), 77).save(tmp_path / name)
        image = read_image(tmp_path / name)
        assert_rgb8(image)
        assert image.shape == (40, 48, 3)
        assert np.abs(image.astype(int) - 77).max() <= 1


def test_rgba_png(tmp_path):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = RED_RGB
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (40, 48, 3)
    assert (image == RED_RGB).all()


@pytest.mark.parametrize("value", [65535, 32768, 4096])
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_to_8bit(tmp_path, value, channels):
    shape = (40, 48) if channels == 1 else (40, 48, 3)
    cv2.imwrite(str(tmp_path / "deep.png"), np.full(shape, value, np.uint16))
    assert cv2.imread(str(tmp_path / "deep.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16-bit
    image = read_image(tmp_path / "deep.png")
    assert_rgb8(image)
    assert np.abs(image.astype(float) - value * 255 / 65535).max() <= 1.0


def test_palette_png(tmp_path):
    Image.new("RGB", (48, 40), RED_RGB).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    image = read_image(tmp_path / "p.png")
    assert image.shape == (40, 48, 3)
    assert (image == RED_RGB).all()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # pure red in CMYK
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    for min_size in (None, 8):
        image = read_image(tmp_path / "c.jpg", min_size)
        assert_rgb8(image)
        red, green, blue = image.reshape(-1, 3).mean(axis=0)
        assert red > 200 and green < 60 and blue < 60


def exif_rotated_jpeg(path: Path, size=(40, 64)) -> Path:
    """A height x width JPEG with a red block at its stored top-left corner and EXIF orientation 6."""
    stored = np.zeros((*size, 3), np.uint8)
    stored[:12, :12] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize("min_size", [None, 10, 20, 64])
def test_exif_orientation_is_applied(tmp_path, min_size):
    path = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    image = read_image(path, min_size)
    height, width = image.shape[:2]
    assert height > width  # 40 x 64 stored, displayed upright as 64 x 40 (or a reduced-scale copy of that)
    assert height * 40 == width * 64
    # the stored top-left corner is the displayed top-right one
    corner = max(1, width // 10)
    assert image[:corner, -corner:, 0].mean() > 150
    assert image[:corner, :corner, 0].mean() < 60


def test_gif(tmp_path):
    Image.new("RGB", (48, 40), RED_RGB).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "g.gif")
    image = read_image(tmp_path / "g.gif")
    assert image.shape == (40, 48, 3)
    assert (image == RED_RGB).all()


def test_pillow_fallback_when_opencv_cannot_decode(tmp_path, monkeypatch):
    """Formats OpenCV lacks go through Pillow: same result, EXIF orientation included."""
    gif = tmp_path / "g.gif"
    Image.new("RGB", (48, 40), RED_RGB).convert("P", palette=Image.Palette.ADAPTIVE).save(gif)
    rotated = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    calls = []

    def opencv_cannot(data, flags):  # returns None, as cv2.imdecode does for a format it lacks
        calls.append(flags)
    monkeypatch.setattr(CreateDataset.cv2, "imdecode", opencv_cannot)
    image = read_image(gif)
    assert calls, "OpenCV was not tried first"
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    assert (image == RED_RGB).all()
    upright = read_image(rotated)
    assert upright.shape == (64, 40, 3)
    assert upright[:6, -6:, 0].mean() > 150


def test_png_named_jpg_and_jpeg_named_png(tmp_path):
    write_image(tmp_path / "really_png.jpg", colour=(0, 200, 0), fmt="PNG")
    write_image(tmp_path / "really_jpeg.png", colour=(0, 200, 0), fmt="JPEG")
    for name in ("really_png.jpg", "really_jpeg.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (40, 48, 3)
        assert np.abs(image.astype(int) - (0, 200, 0)).max() <= 3


def test_non_ascii_and_spaces_in_names(tmp_path):
    folder = tmp_path / "Führerschein ünïcødé"
    paths = [write_image(folder / "scan é 1.jpg", fmt="JPEG"), write_image(folder / "卡 片 2.png")]
    write_image(tmp_path / "plain" / "x.png")
    write_image(tmp_path / "plain" / "y.png")
    index = build_index(tmp_path, seed=0)
    assert set(index.label) == {"Führerschein ünïcødé", "plain"}
    images, skipped = load_images([str(p) for p in paths], 32)
    assert skipped == {}
    assert images.shape == (2, 32, 32, 3)
    assert np.abs(images.astype(int) - RED_RGB).max() <= 3


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp"])
def test_channel_order_is_rgb(tmp_path, ext):
    bgr = np.zeros((40, 48, 3), np.uint8)
    bgr[..., 2] = 255  # pure red, in OpenCV's BGR order
    assert cv2.imwrite(str(tmp_path / f"red.{ext}"), bgr)
    image = read_image(tmp_path / f"red.{ext}")
    assert image[..., 0].min() > 240
    assert image[..., 1:].max() < 15


@pytest.mark.parametrize("source_size", [(40, 48), (8, 8), (300, 120)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_shape(tmp_path, source_size, fmt):
    path = write_image(tmp_path / f"x.{fmt.lower()}", size=source_size, fmt=fmt)
    for img_size in (32, 57):
        image = load_image(path, img_size)
        assert image.shape == (img_size, img_size, 3)
        assert image.dtype == np.uint8
        assert np.abs(image.astype(int) - RED_RGB).max() <= 4


@pytest.mark.parametrize("min_size", [1, 12, 13, 40, 48, 49, 96, 97, 500])
def test_reduced_jpeg_decode_keeps_min_size(tmp_path, min_size):
    path = write_image(tmp_path / "big.jpg", size=(96, 160), fmt="JPEG")
    image = read_image(path, min_size)
    height, width = image.shape[:2]
    assert min(height, width) >= min(min_size, 96)
    assert abs(width / height - 160 / 96) < 0.1  # scaled, not cropped
    assert height <= 96 and width <= 160
    full = read_image(path)
    assert full.shape == (96, 160, 3)


def test_reduced_jpeg_decode_does_reduce(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(256, 320), fmt="JPEG")
    sizes = {min_size: read_image(path, min_size).shape[:2] for min_size in (32, 64, 128)}
    assert sizes == {32: (32, 40), 64: (64, 80), 128: (128, 160)}
    assert load_image(path, 32).shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------------ bad files

def bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["empty"] = folder / "empty.jpg"
    files["empty"].write_bytes(b"")
    files["text"] = folder / "text.jpg"
    files["text"].write_text("this is not a picture\n" * 20)
    full_jpeg = jpeg_bytes((120, 160))
    files["truncated-jpeg"] = folder / "cut.jpg"
    files["truncated-jpeg"].write_bytes(full_jpeg[:len(full_jpeg) // 2])
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(buffer, "PNG")
    files["truncated-png"] = folder / "cut.png"
    files["truncated-png"].write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    files["one-pixel"] = write_image(folder / "dot.png", size=(1, 1))
    files["thin"] = write_image(folder / "thin.png", size=(3, 200))
    return files


@pytest.mark.parametrize("kind", ["empty", "text", "truncated-jpeg", "truncated-png", "one-pixel", "thin"])
def test_bad_file_raises_bad_image_error(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(BadImageError) as error:
        read_image(path)
    assert str(error.value).strip()
    with pytest.raises(BadImageError):
        load_image(path, 32)


def test_image_over_max_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(Files, "MAX_PIXELS", 40 * 40)
    small, big = write_image(tmp_path / "small.png", size=(40, 40)), write_image(tmp_path / "big.png", size=(41, 40))
    assert read_image(small).shape == (40, 40, 3)
    with pytest.raises(BadImageError, match="large|pixels"):
        read_image(big)


def test_pillow_decompression_bomb_limit_follows_max_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses files over twice this
    path = write_image(tmp_path / "bomb.png", size=(40, 48))
    assert read_image(path).shape == (40, 48, 3)  # Pillow's lower limit does not refuse what max_pixels allows
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(BadImageError, match="--max-pixels"):  # what Pillow refuses is named as ours
        read_image(path, max_pixels=100)


def test_load_images_skips_and_reports_bad_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Files, "MAX_PIXELS", 50 * 50)
    good = [write_image(tmp_path / "good" / f"{i}.{ext}", size=(40, 30 + i), colour=(10 * i, 100, 200), fmt=fmt)
            for i, (ext, fmt) in enumerate([("png", "PNG"), ("jpg", "JPEG"), ("png", "PNG")])]
    bad = list(bad_files(tmp_path / "bad").values())
    bad.append(write_image(tmp_path / "bad" / "huge.png", size=(60, 60)))
    bad.append(tmp_path / "bad" / "missing.jpg")
    paths = [str(p) for p in bad[:3] + good[:1] + bad[3:] + good[1:]]
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        images, skipped = load_images(paths, 32)
    assert set(skipped) == {str(p) for p in bad}
    assert all(isinstance(reason, str) and reason.strip() for reason in skipped.values())
    assert images.shape == (len(good), 32, 32, 3) and images.dtype == np.uint8
    for image, path in zip(images, good):  # the good ones, in input order
        assert np.array_equal(image, load_image(path, 32))
    for path in bad:
        assert str(path) in caplog.text


def test_load_images_with_nothing_usable(tmp_path):
    images, skipped = load_images([str(p) for p in bad_files(tmp_path).values()], 40)
    assert images.shape == (0, 40, 40, 3) and images.dtype == np.uint8
    assert len(skipped) == 6
    assert load_images([], 24)[0].shape == (0, 24, 24, 3)


def test_jpeg_with_data_after_end_marker_is_not_truncated(tmp_path):
    path = tmp_path / "trailer.jpg"
    path.write_bytes(jpeg_bytes((40, 48)) + b"SEFH" + bytes(300))  # e.g. a Samsung camera trailer
    assert Image.open(path).load() is not None  # Pillow reads it
    image = read_image(path)
    assert image.shape == (40, 48, 3)


# ----------------------------------------------------------------------------------------- model input

def test_to_model_input_shape_dtype_and_scale():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    images[1, 2, 3] = (0, 0, 0)
    images[1, 4, 4] = (255, 255, 255)
    batch = to_model_input(torch.from_numpy(images))
    assert batch.shape == (2, 3, 6, 5) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[1, :, 2, 3], torch.zeros(3))
    torch.testing.assert_close(batch[1, :, 4, 4], torch.ones(3))
    # channel c of the output is channel c of the HWC input (the model normalises with its own mean/std)
    torch.testing.assert_close(batch, (torch.from_numpy(images).float() / 255).permute(0, 3, 1, 2))
