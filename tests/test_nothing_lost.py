"""Issue 32, nothing lost and nothing silently wrong: every writing flag goes through one check, damaged models
are refused, folders are read as the user meant them, and calibration never stores a degenerate temperature.

Each test reproduces a case an adversarial user met (heatmaps over the images they explain, an export over a
photo, a model with changed bytes, a zip bomb, evaluate's plots inside the data, a class folder that is a link,
a link that cannot be read, a bare string for a list, a zero-size array, a 254-character file name, a
validation split the model never gets wrong) and checks the answer: one `error:` line before any work, exit 2,
or the files used as meant.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from MLPipeline.extras import Calibration, CrossValidation
from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Files import index_folder
from MLPipeline.extras.OutputFolder import check_write_target
from MLPipeline.extras.Report import save_figure
from tests.conftest import train_tiny_model
from tests.test_bad_input import assert_user_error, snapshot
from tests.test_hostile_input import FAST_TRAIN


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained model and its data, shared by the tests that only read them: (data, model.pt)."""
    data, output = train_tiny_model(tmp_path_factory.mktemp("nothing_lost"))
    return data, output / "model.pt"


@pytest.fixture
def data(trained, tmp_path):
    """A copy of the trained model's data that a test may change."""
    return shutil.copytree(trained[0], tmp_path / "data")


# --- 1, 2, 6, 12: every writing flag goes through one check, before any work ---------------------------------

def writing_commands(data, model, target, predicted=None) -> dict[str, list]:
    """Each option that writes, pointed at `target`: flag -> the command line (predict reads `predicted`)."""
    predicted = predicted or data / "alpha" / "000.jpg"
    return {"--csv": ["predict", predicted, "--model", model, "--csv", target],
            "--explain": ["predict", predicted, "--model", model, "--explain", target],
            "export --out": ["export", "--model", model, "--out", target],
            "evaluate --output-dir": ["evaluate", data, "--model", model, "--output-dir", target],
            "train --output-dir": ["--data-dir", data, "--output-dir", target, *FAST_TRAIN],
            "make-demo-data --out": ["make-demo-data", "--out", target, "--per-class", "1"]}


@pytest.mark.parametrize("flag", ["--csv", "--explain", "export --out", "evaluate --output-dir",
                                  "train --output-dir", "make-demo-data --out"])
def test_every_writing_flag_refuses_a_link_before_any_work(trained, data, tmp_path, cli, flag):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    result = cli(*writing_commands(data, trained[1], link)[flag])
    assert_user_error(result, flag.split()[-1], str(link), "symbolic link")
    assert result.stdout == "" and not list(elsewhere.iterdir())


@pytest.mark.parametrize("flag", ["--csv", "--explain", "export --out", "evaluate --output-dir",
                                  "train --output-dir"])
def test_every_writing_flag_refuses_a_place_inside_the_data_or_over_an_image(trained, data, cli, flag):
    before = snapshot(data)
    folder_flag = flag in ("--explain", "evaluate --output-dir", "train --output-dir")
    # a folder inside the data folder, or an image of the data (a file target's case 2: the photo lost)
    target = data / "eval" if folder_flag else data / "beta" / "001.png"
    result = cli(*writing_commands(data, trained[1], target, predicted=data)[flag])
    assert_user_error(result, flag.split()[-1], str(target))
    assert snapshot(data) == before


def test_explain_into_the_folder_it_explains_is_refused_and_its_images_are_kept(trained, data, cli):
    before = snapshot(data / "alpha")
    result = cli("predict", data / "alpha", "--model", trained[1], "--explain", data / "alpha")
    assert_user_error(result, "--explain", "an input of this command")
    assert snapshot(data / "alpha") == before and result.stdout == ""


def test_explain_refuses_a_folder_holding_a_users_image_at_a_name_it_writes(trained, data, tmp_path, cli):
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(data / "alpha" / "001.png", folder / "0000-000.png")  # the name 000.jpg's explanation gets
    before = snapshot(folder)
    result = cli("predict", data / "alpha" / "000.jpg", "--model", trained[1], "--explain", folder)
    assert_user_error(result, "--explain", "0000-000.png")
    assert snapshot(folder) == before
    (folder / "0000-000.png").unlink()
    save_figure(Figure(), folder / "0000-000.png")  # an explanation of an earlier run: replaced
    result = cli("predict", data / "alpha" / "000.jpg", "--model", trained[1], "--explain", folder, "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert (folder / "0000-000.png").stat().st_size > 10_000 and len(list(folder.iterdir())) == 1


def test_explain_naming_an_existing_file_fails_before_any_prediction(trained, data, tmp_path, cli):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")
    result = cli("predict", data / "alpha", "--model", trained[1], "--explain", existing)
    assert_user_error(result, "--explain", str(existing), "is a file")
    assert result.stdout == "" and existing.read_text() == "mine\n"


def test_export_refuses_an_image_whatever_its_name(trained, tmp_path, cli):
    photo = tmp_path / "holiday.onnx"  # a JPEG under an export's name: known by its content
    shutil.copy(trained[0] / "alpha" / "000.jpg", photo)
    before = photo.read_bytes()
    assert_user_error(cli("export", "--model", trained[1], "--out", photo), "--out", str(photo), "image")
    assert photo.read_bytes() == before


def test_check_write_target_lets_an_earlier_output_of_the_same_kind_be_replaced(tmp_path):
    (tmp_path / "p.csv").write_text("input,label\n")
    check_write_target(tmp_path / "p.csv", "--csv", folder=False)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="--cache-dir .*fifo.*not a regular file or folder"):
        check_write_target(tmp_path / "fifo", "--cache-dir", folder=True)
    with pytest.raises(UserError, match="--csv .*is a folder"):
        check_write_target(tmp_path, "--csv", folder=False)


def test_evaluate_may_not_write_inside_the_data_it_scores_so_training_sees_no_extra_class(trained, data, cli):
    result = cli("evaluate", data, "--model", trained[1], "--output-dir", data / "eval")
    assert_user_error(result, "--output-dir", "inside the data folder")
    assert sorted(index_folder(data).label.unique()) == ["alpha", "beta", "gamma"]


def test_a_csv_name_of_254_characters_is_written(trained, tmp_path, cli):
    csv = tmp_path / ("p" * 250 + ".csv")
    result = cli("predict", trained[0] / "alpha", "--model", trained[1], "--csv", csv, "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(csv)) == 8 and [path.name for path in tmp_path.iterdir()] == [csv.name]


# --- 3, 10: a damaged model is refused, and a zip bomb before it expands ---------------------------------------

def test_a_model_with_changed_bytes_in_its_weights_is_refused(trained, tmp_path, cli):
    damaged = tmp_path / "model.pt"
    shutil.copy(trained[1], damaged)
    with zipfile.ZipFile(damaged) as archive:  # head.weight: 3 classes x 512 float32 features of ResNet18
        head = next(member for member in archive.infolist() if member.file_size == 3 * 512 * 4)
        start = head.header_offset + 30 + len(head.filename.encode()) + len(head.extra)
    raw = bytearray(damaged.read_bytes())
    local_extra = int.from_bytes(raw[head.header_offset + 28:head.header_offset + 30], "little")
    start = head.header_offset + 30 + len(head.filename.encode()) + local_extra
    raw[start + 100] ^= 0x40  # one weight of the head, changed: torch.load alone would use it
    damaged.write_bytes(bytes(raw))
    assert_user_error(cli("predict", trained[0] / "alpha", "--model", damaged), str(damaged), "damaged")


def test_a_zip_bomb_named_model_pt_is_refused_before_it_expands(tmp_path, cli):
    bomb = tmp_path / "model.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("archive/data/0", "w", force_zip64=True) as member:
        for _ in range(4):
            member.write(bytes(1 << 24))  # 64 MiB of zeros in 64 KB: torch.save never compresses
    started = time.monotonic()
    assert_user_error(cli("predict", tmp_path, "--model", bomb), str(bomb), "zip bomb")
    assert time.monotonic() - started < 10


# --- 7, 11: folders as the user meant them -----------------------------------------------------------------

def test_a_class_folder_that_links_to_another_class_is_read_once_under_the_real_name(data, caplog):
    (data / "zeta").symlink_to(data / "alpha", target_is_directory=True)
    (data / "beta" / "more").symlink_to(data / "gamma", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        index = index_folder(data)
    assert index.groupby("label").size().to_dict() == {"alpha": 8, "beta": 8, "gamma": 8}
    assert "class folder " + str(data / "zeta") + " is a link to " + str(data / "alpha") in caplog.text


def test_a_link_that_cannot_be_followed_is_passed_over_with_its_reason(trained, data, cli):
    # A link loop fails as a link into a folder the run may not search does (EACCES, which root never meets)
    (data / "alpha" / "loop.jpg").symlink_to(data / "alpha" / "loop.jpg")
    assert len(index_folder(data)) == 25  # listed, not a stop: decoding names why it cannot be used
    result = cli("predict", data / "alpha", "--model", trained[1], "--workers", "0", "--no-review")
    assert result.returncode == 2 and len(result.stdout.splitlines()) == 8  # the other 8 classified
    assert "loop.jpg: cannot be read (Too many levels of symbolic links)" in result.stderr


# --- 9, 12: the Python API -----------------------------------------------------------------------------------

def test_predict_takes_a_bare_path_as_one_input_and_a_zero_size_array_as_an_error_row(trained):
    from MLPipeline.extras.Predict import load_model, predict
    model = load_model(trained[1], "cpu")
    one = predict(model, str(trained[0] / "alpha" / "000.jpg"))
    assert list(one.input) == [str(trained[0] / "alpha" / "000.jpg")] and one.error.tolist() == [""]
    assert len(predict(model, trained[0] / "beta")) == 8  # a bare folder: its images
    rows = predict(model, [np.zeros((0, 0, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)])
    assert rows.error[0].startswith("arrays must be H x W x 3") and rows.error[1] == ""


def test_too_few_images_for_the_folds_names_the_class_not_its_index():
    features, labels = torch.randn(16, 4), torch.tensor([0] * 10 + [1] * 6)
    with pytest.raises(UserError, match="class 'others' has 6 images, fewer than --folds 7"):
        CrossValidation.cross_validate(features, labels, ["licence", "others"], 7, 0, lambda x, y: None)


# --- calibration ---------------------------------------------------------------------------------------------

def test_a_validation_split_without_mistakes_leaves_the_model_uncalibrated(caplog):
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]] * 10)
    with caplog.at_level(logging.WARNING):
        assert Calibration.fit_temperature(logits, torch.tensor([0, 1] * 10)) is None
    assert "gets all 20 validation images right" in caplog.text


def test_too_few_images_or_a_temperature_at_its_bound_leave_the_model_uncalibrated(caplog):
    with caplog.at_level(logging.WARNING):
        assert Calibration.fit_temperature(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])) is None
        every_one_wrong = torch.tensor([[0.0, 3.0], [3.0, 0.0]] * 10)
        assert Calibration.fit_temperature(every_one_wrong, torch.tensor([0, 1] * 10)) is None
    assert "too few" in caplog.text and "at the edge of its range" in caplog.text
