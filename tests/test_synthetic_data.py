"""The synthetic demo data: layout, determinism, decodability, variety, and refusing to overwrite."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from MLPipeline.CreateDataset import UserError
from MLPipeline.extras.SyntheticData import CLASS_NAMES, fake_ssn, make_demo_data

PER_CLASS = 20


def file_hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """One run of 20 images per class, made by the default worker pool; shared, read-only."""
    out_dir = tmp_path_factory.mktemp("demo")
    return out_dir, make_demo_data(out_dir, per_class=PER_CLASS, seed=0)


def test_folders_names_and_counts(demo):
    out_dir, counts = demo
    assert counts == {name: PER_CLASS for name in CLASS_NAMES}
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(CLASS_NAMES)
    for name in CLASS_NAMES:
        names = sorted(path.name for path in (out_dir / name).iterdir())
        assert names == [f"{name}_{index:04d}.jpg" for index in range(PER_CLASS)]


def test_every_file_decodes_with_varied_sizes_and_no_duplicates(demo):
    out_dir, _ = demo
    sizes = set()
    for name in CLASS_NAMES:
        paths = sorted((out_dir / name).glob("*.jpg"))
        hashes = {hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
        assert len(hashes) == len(paths), f"identical images in {name}"
        for path in paths:
            image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None and image.ndim == 3, path
            height, width = image.shape[:2]
            assert min(height, width) >= 300 and max(height, width) <= 1600, (path, image.shape)
            sizes.add((width, height))
    assert len(sizes) >= 2 * PER_CLASS, f"only {len(sizes)} distinct sizes"
    assert any(width > height for width, height in sizes) and any(height > width for width, height in sizes)


def test_same_seed_same_bytes_in_one_process_and_smaller_runs_are_a_prefix(demo, tmp_path):
    out_dir, _ = demo
    make_demo_data(tmp_path, per_class=4, seed=0, workers=1)
    smaller = file_hashes(tmp_path)
    assert len(smaller) == 12
    assert smaller == {path: digest for path, digest in file_hashes(out_dir).items() if path in smaller}


def test_different_seed_gives_different_images(demo, tmp_path):
    out_dir, _ = demo
    make_demo_data(tmp_path, per_class=4, seed=1, workers=1)
    other_seed = file_hashes(tmp_path)
    first_seed = file_hashes(out_dir)
    assert all(digest != first_seed[path] for path, digest in other_seed.items())


def test_refuses_a_folder_that_holds_images_unless_forced(tmp_path):
    (tmp_path / "old").mkdir()
    cv2.imwrite(str(tmp_path / "old" / "photo.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match=r"holds 1 images.*--force.*--out"):
        make_demo_data(tmp_path, per_class=1)
    assert not (tmp_path / "others").exists(), "nothing may be written before refusing"
    assert make_demo_data(tmp_path, per_class=1, force=True, workers=1) == {name: 1 for name in CLASS_NAMES}
    assert (tmp_path / "old" / "photo.png").exists() and (tmp_path / "others" / "others_0000.jpg").exists()


@pytest.mark.parametrize("contents", [[], ["README.md", "notes.txt"]], ids=["empty", "non-images"])
def test_a_folder_without_images_is_fine(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_text("not an image")
    make_demo_data(tmp_path, per_class=1, workers=1)
    assert len(list(tmp_path.rglob("*.jpg"))) == len(CLASS_NAMES)


@pytest.mark.parametrize("per_class", [0, -3])
def test_per_class_below_one_is_a_user_error(tmp_path, per_class):
    with pytest.raises(UserError, match="--per-class"):
        make_demo_data(tmp_path / "out", per_class=per_class)
    assert not (tmp_path / "out").exists()


def test_out_path_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "Data").write_text("")
    with pytest.raises(UserError, match="is a file"):
        make_demo_data(tmp_path / "Data", per_class=1)


def test_social_security_numbers_come_only_from_never_issued_areas():
    numbers = [fake_ssn(np.random.default_rng([7, index])) for index in range(2000)]
    assert all(re.fullmatch(r"\d{3}-\d{2}-\d{4}", number) for number in numbers)
    areas = {int(number[:3]) for number in numbers}
    assert areas <= {0} | set(range(900, 1000)) and 0 in areas and len(areas) > 50
