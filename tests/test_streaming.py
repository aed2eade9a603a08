"""Datasets larger than memory: features streamed through the backbone batch by batch, kept on disk between
runs, and images decoded (in worker processes) when training needs them every epoch."""
from __future__ import annotations

import logging
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from MLPipeline import CreateDataset, TrainConfig, train
from MLPipeline.CreateDataset import forward_batches, image_batches, list_images, load_images
from MLPipeline.FeatureCache import FeatureCache, backbone_fingerprint, cached
from MLPipeline.ResNet_Model import build_model

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
    real = CreateDataset.load_image

    def counting(*args):
        count["files"] += 1
        return real(*args)
    monkeypatch.setattr(CreateDataset, "load_image", counting)
    return count


def paths_of(folder) -> list[str]:
    return [str(path) for path in list_images(folder)]


def streamed_features(model, paths: list[str], batch_size: int = 8):
    """What a training run computes: the backbone's features, batch by batch as the files decode."""
    features, _, positions, skipped = forward_batches(model.features, image_batches(paths, IMG_SIZE, batch_size),
                                                      CPU, len(paths))
    return features, positions, skipped


def features_through_cache(model, paths: list[str], folder) -> tuple[torch.Tensor, FeatureCache]:
    """What a training run does: features from the cache under `folder`, the rest computed, the cache saved."""
    run = cached(lambda some: streamed_features(model, some), folder, backbone_fingerprint(model, "resnet18", IMG_SIZE),
                 model.head.in_features)
    features = run(paths)[0]
    run.save()
    return features, run.cache


def test_streamed_features_equal_features_of_images_held_in_memory(model, data, tmp_path):
    paths = paths_of(data) + [str(tmp_path / "missing.png")]
    streamed, positions, skipped = streamed_features(model, paths, batch_size=5)
    images, _ = load_images(paths[:-1], IMG_SIZE)
    with torch.inference_mode():
        in_memory = model.features(CreateDataset.to_model_input(torch.from_numpy(images)))
    assert positions == list(range(len(paths) - 1)) and list(skipped) == [paths[-1]]
    torch.testing.assert_close(streamed, in_memory, rtol=1e-4, atol=1e-5)


def test_image_batches_decode_in_worker_processes_as_in_this_one(data, tmp_path):
    paths = paths_of(data) + [str(tmp_path / "missing.png")]
    batches = [list(image_batches(paths, IMG_SIZE, 4, workers=workers)) for workers in (0, 2)]
    for in_main, in_workers in zip(*batches):
        assert torch.equal(in_main[0], in_workers[0]) and in_main[2:] == in_workers[2:]
    assert sum(len(batch[0]) for batch in batches[1]) == len(paths) - 1
    assert [list(batch[3]) for batch in batches[1] if batch[3]] == [[paths[-1]]]


def test_second_run_reads_every_feature_from_the_cache(model, data, tmp_path, decode_count):
    paths = paths_of(data)
    first = features_through_cache(model, paths, tmp_path / "cache")[0]
    assert decode_count["files"] == len(paths)
    second = features_through_cache(model, paths, tmp_path / "cache")[0]
    assert decode_count["files"] == len(paths)  # nothing decoded the second time
    assert torch.equal(first, second)


def test_a_changed_file_is_computed_again_alone(model, data, tmp_path, decode_count):
    paths = paths_of(data)
    before = features_through_cache(model, paths, tmp_path / "cache")[0]
    changed = paths[3]
    cv2.imwrite(changed, np.full((40, 48, 3), 255, np.uint8))
    os.utime(changed, ns=(0, os.stat(changed).st_mtime_ns + 10**9))  # a new size and time, whatever the clock
    decode_count["files"] = 0
    after = features_through_cache(model, paths, tmp_path / "cache")[0]
    assert decode_count["files"] == 1
    assert not torch.allclose(before[3], after[3])
    torch.testing.assert_close(torch.cat([before[:3], before[4:]]), torch.cat([after[:3], after[4:]]))


def test_saving_the_cache_makes_no_second_copy_of_the_features(model, data, tmp_path, monkeypatch):
    paths = paths_of(data)
    cache = FeatureCache(tmp_path / "cache", backbone_fingerprint(model, "resnet18", IMG_SIZE))
    features = streamed_features(model, paths)[0]
    cache.update(paths, list(range(len(paths))), features)

    def no_stacking(*args, **kwargs):
        raise AssertionError("the rows were stacked into a copy")
    monkeypatch.setattr(torch, "stack", no_stacking)
    cache.save()
    monkeypatch.undo()
    reloaded = FeatureCache(tmp_path / "cache", cache.fingerprint)
    assert torch.equal(torch.stack([reloaded[key] for key in cache.rows]), features)


def test_rows_no_key_uses_are_not_written(model, tmp_path):
    cache = FeatureCache(tmp_path / "cache", backbone_fingerprint(model, "resnet18", IMG_SIZE))
    computed = torch.randn(100, 512)  # one run's features, of which 3 rows are still some file's
    cache.blocks, cache.starts = [torch.randn(10, 512), computed], [0, 10]
    cache.rows = {bytes([row]) * 16: 10 + row for row in (0, 50, 99)}
    cache.save()
    assert cache.path.stat().st_size < computed[:10].nbytes  # packed: 3 rows written, not 110
    reloaded = FeatureCache(tmp_path / "cache", cache.fingerprint)
    assert torch.equal(reloaded[bytes([50]) * 16], computed[50]) and len(reloaded.rows) == 3


def test_blocks_no_key_uses_are_left_out_and_the_rest_renumbered(model, tmp_path):
    cache = FeatureCache(tmp_path / "cache", backbone_fingerprint(model, "resnet18", IMG_SIZE))
    dead, second, third = torch.randn(10, 512), torch.randn(4, 512), torch.randn(2, 512)
    cache.blocks, cache.starts = [dead, second, third], [0, 10, 14]
    cache.rows = {bytes([row]) * 16: row for row in range(10, 16)}  # every row of the 2nd and 3rd blocks
    cache.save()
    reloaded = FeatureCache(tmp_path / "cache", cache.fingerprint)
    assert len(reloaded.blocks) == 2 and reloaded.starts == [0, 4]  # the dead block is not written
    assert all(torch.equal(reloaded[bytes([row]) * 16], torch.cat([second, third])[row - 10]) for row in range(10, 16))


def test_other_weights_do_not_share_a_cache(model):
    other = build_model(3, "resnet18", weights="none")[0]
    assert backbone_fingerprint(model, "resnet18", IMG_SIZE) != backbone_fingerprint(other, "resnet18", IMG_SIZE)
    assert backbone_fingerprint(model, "resnet18", IMG_SIZE) != backbone_fingerprint(model, "resnet18", 64)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "wrong-width"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(model, data, tmp_path, caplog, decode_count, damage):
    paths = paths_of(data)
    expected, cache = features_through_cache(model, paths, tmp_path / "cache")
    if damage == "garbage":
        cache.path.write_bytes(b"not a cache")
    elif damage == "truncated":
        cache.path.write_bytes(cache.path.read_bytes()[:500])
    elif damage == "foreign":
        torch.save({"format": "something else"}, cache.path)
    else:  # right format and fingerprint, features of another width: they would fail in the head, far from here
        stored = torch.load(cache.path, weights_only=True)
        torch.save({**stored, "blocks": [block[:, :10] for block in stored["blocks"]]}, cache.path)
    decode_count["files"] = 0
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        features = features_through_cache(model, paths, tmp_path / "cache")[0]
    assert "feature cache" in caplog.text and str(cache.path) in caplog.text
    assert decode_count["files"] == len(paths)
    torch.testing.assert_close(features, expected)
    assert len(FeatureCache(tmp_path / "cache", cache.fingerprint).rows) == len(paths)  # sound again


@pytest.mark.parametrize("change", [{"lr": 1e-4, "epochs": 2}, {"seed": 7}, {"val_size": 0.25},
                                    {"schedule": "cosine", "epochs": 2}])
def test_training_runs_share_the_cache_across_head_settings(data, tmp_path, decode_count, change):
    # Pretrained weights: a random backbone would be drawn from --seed, and rightly get a cache of its own.
    settings = dict(data_dir=data, output_dir=tmp_path / "out", img_size=IMG_SIZE, weights="imagenet",
                    backbone="efficientnet_lite0", epochs=1, workers=0)
    train(TrainConfig(**settings))
    decoded = decode_count["files"]
    assert decoded == len(paths_of(data))
    second = train(TrainConfig(**{**settings, **change}))
    assert decode_count["files"] == decoded  # the second run decoded nothing
    fresh = train(TrainConfig(**{**settings, **change, "output_dir": tmp_path / "fresh"}))  # no cache there
    assert decode_count["files"] == 2 * decoded
    torch.testing.assert_close(second.test_logits, fresh.test_logits)  # cached features train the same head
    assert [row["train_loss"] for row in second.metrics["history"]] == pytest.approx(
        [row["train_loss"] for row in fresh.metrics["history"]], rel=1e-5)


def test_an_added_or_renamed_file_is_computed_alone(model, data, tmp_path, decode_count):
    paths = paths_of(data)
    features_through_cache(model, paths, tmp_path / "cache")
    added = data / "alpha" / "added.png"
    shutil.copy(paths[0], added)
    renamed = paths[1].replace(".png", "-renamed.png").replace(".jpg", "-renamed.jpg")
    os.rename(paths[1], renamed)
    now = [str(added), renamed, *paths[:1], *paths[2:]]
    decode_count["files"] = 0
    features = features_through_cache(model, now, tmp_path / "cache")[0]
    assert decode_count["files"] == 2  # the added file and the renamed one; the rest came from the cache
    torch.testing.assert_close(features, streamed_features(model, now)[0], rtol=1e-4, atol=1e-5)


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
    from MLPipeline import Common
    monkeypatch.setattr(Common, "PROGRESS_SECONDS", 0.0)
    features = torch.randn(40, 5)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, torch.zeros(40, 0)), 8)
    with caplog.at_level(logging.INFO, logger="MLPipeline"):
        outputs = forward_batches(lambda rows: rows * 2, batches, CPU, len(features), "scoring")[0]
    torch.testing.assert_close(outputs, features * 2)
    assert "scoring: 8/40" in caplog.text
