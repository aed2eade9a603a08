"""Datasets larger than memory: features streamed through the backbone batch by batch, kept on disk between
runs, and images decoded (in worker processes) when training needs them every epoch."""
from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import torch

from MLPipeline.extras import FeatureCache, Files
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train
from MLPipeline.CreateDataset import image_batches, to_model_input
from MLPipeline.extras.Files import list_images, load_image
from MLPipeline.extras.Data import load_images
from MLPipeline.extras.Weights import build_model
from MLPipeline.ResNet_Model import forward_batches

IMG_SIZE = 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(3, "resnet18", weights="none")[0].eval()


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny dataset, free to change."""
    for path in list_images(tiny_data):
        target = tmp_path / "data" / path.relative_to(tiny_data)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return tmp_path / "data"


@pytest.fixture
def decode_count(monkeypatch):
    """How many files the decode path read since the test started (in this process: workers=0)."""
    count = {"files": 0}
    real = Files.read_image

    def counting(*args):
        count["files"] += 1
        return real(*args)
    monkeypatch.setattr(Files, "read_image", counting)
    return count


def paths_of(folder) -> list[str]:
    return [str(path) for path in list_images(folder)]


def streamed_features(model, paths: list[str], batch_size: int = 8):
    """What a training run computes: the backbone's features, batch by batch as the files decode."""
    features, _, positions, skipped = forward_batches(model.features, image_batches(
        paths, IMG_SIZE, batch_size, load_image=load_image), CPU)
    return features, positions, skipped


def run(data, output_dir, **overrides):
    """A training run of seconds: random ResNet18 (drawn from the seed, so the same backbone every run), 32 px,
    its features kept in output_dir/cache (--cache-dir)."""
    return train(TrainConfig(**{**dict(data_dir=data, output_dir=output_dir, img_size=IMG_SIZE, weights="none",
                                       backbone="resnet18", epochs=1, workers=0, cache_dir=output_dir / "cache",
                                       precision="fp32"),
                                **overrides}))


def stored_cache(output_dir) -> dict:
    [path] = (output_dir / "cache").glob("features-*.pt")
    return torch.load(path, weights_only=True)


def test_streamed_features_equal_features_of_images_held_in_memory(model, data, tmp_path):
    paths = paths_of(data) + [str(tmp_path / "missing.png")]
    streamed, positions, skipped = streamed_features(model, paths, batch_size=5)
    images, _ = load_images(paths[:-1], IMG_SIZE)
    with torch.inference_mode():
        in_memory = model.features(to_model_input(torch.from_numpy(images)))
    assert positions == list(range(len(paths) - 1)) and list(skipped) == [paths[-1]]
    torch.testing.assert_close(streamed, in_memory, rtol=1e-4, atol=1e-5)


def test_image_batches_decode_in_worker_processes_as_in_this_one(data, tmp_path):
    paths = paths_of(data) + [str(tmp_path / "missing.png")]
    batches = [list(image_batches(paths, IMG_SIZE, 4, workers=workers)) for workers in (0, 2)]
    for in_main, in_workers in zip(*batches):
        assert torch.equal(in_main[0], in_workers[0]) and in_main[2:] == in_workers[2:]
    assert sum(len(batch[0]) for batch in batches[1]) == len(paths) - 1
    assert [list(batch[3]) for batch in batches[1] if batch[3]] == [[paths[-1]]]


def test_second_run_reads_every_feature_from_the_cache(data, tmp_path, decode_count):
    first = run(data, tmp_path / "out")
    assert decode_count["files"] == len(paths_of(data))
    second = run(data, tmp_path / "out")
    assert decode_count["files"] == len(paths_of(data))  # nothing decoded the second time
    torch.testing.assert_close(second.test_logits, first.test_logits)


def test_the_cache_holds_the_features_of_the_files_read_by_their_content(model, data, tmp_path):
    run(data, tmp_path / "out")
    stored = stored_cache(tmp_path / "out")
    paths = paths_of(data)
    assert sorted(stored["keys"]) == sorted(FeatureCache.content_key(path) for path in paths)
    torch.manual_seed(42)  # train() seeds so before it builds the model: the backbone of the run
    backbone = build_model(3, "resnet18", weights="none")[0].eval()
    expected = streamed_features(backbone, paths)[0]
    order = [stored["keys"].index(FeatureCache.content_key(path)) for path in paths]
    torch.testing.assert_close(stored["features"][order], expected, rtol=1e-4, atol=1e-5)


def test_an_image_edited_in_place_with_its_size_and_time_kept_is_computed_again(data, tmp_path, decode_count):
    edited = str(data / "alpha" / "edited.bmp")  # uncompressed: other pixels, the same size
    cv2.imwrite(edited, np.full((40, 48, 3), 30, np.uint8))
    run(data, tmp_path / "out")
    status = os.stat(edited)
    cv2.imwrite(edited, np.full((40, 48, 3), 220, np.uint8))
    os.utime(edited, ns=(status.st_atime_ns, status.st_mtime_ns))  # as a tool that keeps the time leaves it
    assert (os.stat(edited).st_size, os.stat(edited).st_mtime_ns) == (status.st_size, status.st_mtime_ns)
    decode_count["files"] = 0
    run(data, tmp_path / "out", lr=0.01)
    assert decode_count["files"] == 1


def test_a_warm_cache_skips_what_a_cold_run_skips(data, tmp_path, cli):
    run(data, tmp_path / "out")
    limited = 40 * 48 - 1  # every tiny image has 40 x 48 pixels: over this limit, all are skipped
    settings = ["--data-dir", data, "--img-size", IMG_SIZE, "--weights", "none", "--backbone", "resnet18",
                "--epochs", 1, "--workers", 0, "--max-pixels", limited]
    warm = cli(*settings, "--output-dir", tmp_path / "out", "--cache-dir", tmp_path / "out" / "cache")
    cold = cli(*settings, "--output-dir", tmp_path / "cold")
    assert warm.returncode == cold.returncode == 2
    assert warm.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1]
    assert "too large" in warm.stderr


def test_other_weights_and_settings_do_not_share_a_cache(model):
    other = build_model(3, "resnet18", weights="none")[0]
    fingerprint = FeatureCache.fingerprint
    assert fingerprint(model, "resnet18", IMG_SIZE, 10**6) != fingerprint(other, "resnet18", IMG_SIZE, 10**6)
    assert fingerprint(model, "resnet18", IMG_SIZE, 10**6) != fingerprint(model, "resnet18", 64, 10**6)
    assert fingerprint(model, "resnet18", IMG_SIZE, 10**6) != fingerprint(model, "resnet18", IMG_SIZE, 10**5)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "wrong-width", "rows-past-the-end", "changed-bytes"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(data, tmp_path, caplog, decode_count, damage):
    expected = run(data, tmp_path / "out")
    [path] = (tmp_path / "out" / "cache").glob("features-*.pt")
    if damage == "garbage":
        path.write_bytes(b"not a cache")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "foreign":
        torch.save({"format": "something else"}, path)
    elif damage == "wrong-width":  # right format and fingerprint: features that would fail in the head, far away
        stored = torch.load(path, weights_only=True)
        torch.save({**stored, "features": stored["features"][:, :10]}, path)
    elif damage == "rows-past-the-end":
        stored = torch.load(path, weights_only=True)
        torch.save({**stored, "rows": [row + 1000 for row in stored["rows"]]}, path)
    else:  # a few bytes of the stored features changed: the zip's CRC no longer matches
        raw = bytearray(path.read_bytes())
        at = raw.find(stored_cache(tmp_path / "out")["features"][0].numpy().tobytes()[:16])
        raw[at:at + 4] = bytes(4)
        path.write_bytes(bytes(raw))
    decode_count["files"] = 0
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        again = run(data, tmp_path / "out")
    assert "feature cache" in caplog.text and str(path) in caplog.text
    assert decode_count["files"] == len(paths_of(data))
    torch.testing.assert_close(again.test_logits, expected.test_logits)
    assert len(stored_cache(tmp_path / "out")["keys"]) == len(paths_of(data))  # sound again


def test_copies_of_a_file_share_its_features_and_a_second_run_reads_them_all(data, tmp_path, decode_count):
    (data / "beta" / "copy.png").write_bytes((data / "alpha" / "001.png").read_bytes())  # the same bytes
    run(data, tmp_path / "out")
    decode_count["files"] = 0
    run(data, tmp_path / "out", lr=0.01)
    assert decode_count["files"] == 0  # every file from the cache, the copy too
    stored = stored_cache(tmp_path / "out")
    assert len(stored["keys"]) == len(paths_of(data)) - 1 and len(stored["features"]) == len(paths_of(data))


def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_run(data, tmp_path, caplog, monkeypatch):
    def refused(path):
        raise PermissionError(1, f"could not write {path} (Operation not permitted)")
    monkeypatch.setattr(FeatureCache, "atomic_write", refused)  # as in a read-only folder (root may write anywhere)
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        result = run(data, tmp_path / "out")
    assert "the feature cache was not saved" in caplog.text
    assert (tmp_path / "out" / "model.pt").exists() and result.metrics["test_accuracy"] >= 0


@pytest.mark.parametrize("change", [{"lr": 1e-4, "epochs": 2}, {"seed": 7}, {"val_size": 0.25},
                                    {"schedule": "cosine", "epochs": 2}])
def test_training_runs_share_the_cache_across_head_settings(data, tmp_path, decode_count, change):
    # Pretrained weights: a random backbone would be drawn from --seed, and rightly get a cache of its own.
    settings = dict(data_dir=data, output_dir=tmp_path / "out", img_size=IMG_SIZE, weights="imagenet",
                    backbone="efficientnet_lite0", epochs=1, workers=0, cache_dir=tmp_path / "cache")
    train(TrainConfig(**settings))
    decoded = decode_count["files"]
    assert decoded == len(paths_of(data))
    second = train(TrainConfig(**{**settings, **change}))
    assert decode_count["files"] == decoded  # the second run decoded nothing
    fresh = train(TrainConfig(**{**settings, **change, "output_dir": tmp_path / "fresh", "cache_dir": None}))
    assert decode_count["files"] == 2 * decoded
    torch.testing.assert_close(second.test_logits, fresh.test_logits)  # cached features train the same head
    assert [row["train_loss"] for row in second.metrics["history"]] == pytest.approx(
        [row["train_loss"] for row in fresh.metrics["history"]], rel=1e-5)


def test_an_added_file_is_computed_alone_and_a_renamed_one_not_at_all(data, tmp_path, decode_count):
    paths = paths_of(data)
    first = run(data, tmp_path / "out")
    added = data / "alpha" / "added.png"
    cv2.imwrite(str(added), np.full((40, 48, 3), 200, np.uint8))
    os.rename(paths[1], paths[1].replace(".png", "-renamed.png").replace(".jpg", "-renamed.jpg"))
    decode_count["files"] = 0
    run(data, tmp_path / "out", lr=0.01)
    assert decode_count["files"] == 1  # the added file; the renamed one's content is in the cache
    assert first.metrics["dataset"]["skipped_count"] == 0


def test_worker_processes_train_the_same_model_as_the_main_process(tiny_data, tmp_path):
    settings = dict(data_dir=tiny_data, img_size=IMG_SIZE, weights="none", backbone="resnet18", epochs=2,
                    feature_cache=False, device="cpu")
    in_main = train(TrainConfig(**settings, output_dir=tmp_path / "main", workers=0))
    in_workers = train(TrainConfig(**settings, output_dir=tmp_path / "workers", workers=2))
    assert in_workers.metrics["trained_on"] == "images"
    for key in ("train_loss", "test_loss"):
        assert [row[key] for row in in_main.metrics["history"]] == pytest.approx(
            [row[key] for row in in_workers.metrics["history"]], rel=1e-5)
    for name, tensor in in_main.model.state_dict().items():
        torch.testing.assert_close(in_workers.model.state_dict()[name], tensor)


def test_progress_of_batches_without_files_counts_their_rows(monkeypatch, caplog):
    """Scoring features (TensorDataset batches, no file positions) reports progress instead of dividing by 0."""
    from MLPipeline import ResNet_Model
    monkeypatch.setattr(ResNet_Model, "PROGRESS_SECONDS", -1.0)
    features = torch.randn(40, 5)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, torch.zeros(40, 0)), 8)
    with caplog.at_level(logging.INFO, logger="MLPipeline"):
        outputs = forward_batches(lambda rows: rows * 2, batches, CPU, label="scoring")[0]
    torch.testing.assert_close(outputs, features * 2)
    assert "scoring: 8/40" in caplog.text


def test_a_custom_cache_folder_loses_the_leftover_of_a_killed_run(data, tmp_path):
    run(data, tmp_path / "out", cache_dir=tmp_path / "features")
    [cache_file] = (tmp_path / "features").glob("features-*.pt")
    leftover = tmp_path / "features" / f".{cache_file.name}.k1ll3d00.tmp"  # atomic_write's name, half written
    leftover.write_bytes(b"half a cache")
    cv2.imwrite(str(data / "beta" / "new.png"), np.full((40, 48, 3), 90, np.uint8))  # new features to save
    run(data, tmp_path / "out", cache_dir=tmp_path / "features", lr=0.01)
    assert not leftover.exists()
