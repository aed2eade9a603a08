"""Datasets larger than memory: features streamed through the backbone, kept on disk between runs,
and images read from disk (in worker processes) when training needs them every epoch."""
from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import torch

from MLPipeline import CreateDataset, TrainConfig, train
from MLPipeline.CreateDataset import decode_to_disk, list_images, load_images
from MLPipeline.FeatureCache import FeatureCache, backbone_fingerprint, extract_features
from MLPipeline.ResNet_Model import build_model, forward_in_batches

IMG_SIZE = 32


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
    """How many files the decode path read since the test started."""
    count = {"files": 0}
    real = CreateDataset.load_or_reason

    def counting(*args):
        count["files"] += 1
        return real(*args)
    monkeypatch.setattr(CreateDataset, "load_or_reason", counting)
    return count


def paths_of(folder) -> list[str]:
    return [str(path) for path in list_images(folder)]


def features_through_cache(model, paths: list[str], folder) -> tuple[torch.Tensor, FeatureCache]:
    """What a training run does: features from the cache under `folder`, the rest computed, the cache saved."""
    cache = FeatureCache(folder, backbone_fingerprint(model, "resnet18", IMG_SIZE))
    features = extract_features(model, paths, IMG_SIZE, torch.device("cpu"), 8, cache)[0]
    cache.update(paths, list(range(len(paths))), features)
    cache.save()
    return features, cache


def test_streamed_features_equal_features_of_images_held_in_memory(model, data):
    paths = paths_of(data)
    streamed, positions, skipped = extract_features(model, paths, IMG_SIZE, torch.device("cpu"), 5, cache=None)
    images, _ = load_images(paths, IMG_SIZE)
    in_memory = forward_in_batches(model.features, images, torch.device("cpu"), 64)
    assert positions == list(range(len(paths))) and not skipped
    torch.testing.assert_close(streamed, in_memory, rtol=1e-4, atol=1e-5)


def test_decoded_to_disk_equals_decoded_in_memory(data, tmp_path):
    paths = paths_of(data) + [str(tmp_path / "missing.png")]
    on_disk, positions, skipped = decode_to_disk(paths, IMG_SIZE, tmp_path / "cache")
    in_memory, _ = load_images(paths, IMG_SIZE)
    assert isinstance(on_disk, np.memmap) and np.array_equal(on_disk, in_memory)
    assert positions == list(range(len(paths) - 1)) and list(skipped) == [paths[-1]]
    assert not list((tmp_path / "cache").iterdir())  # the decoded file is anonymous: gone with the run


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
    features = extract_features(model, paths, IMG_SIZE, torch.device("cpu"), 8, cache)[0]
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


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(model, data, tmp_path, caplog, decode_count, damage):
    paths = paths_of(data)
    expected, cache = features_through_cache(model, paths, tmp_path / "cache")
    if damage == "garbage":
        cache.path.write_bytes(b"not a cache")
    elif damage == "truncated":
        cache.path.write_bytes(cache.path.read_bytes()[:500])
    else:
        torch.save({"format": "something else"}, cache.path)
    decode_count["files"] = 0
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        features = features_through_cache(model, paths, tmp_path / "cache")[0]
    assert "feature cache" in caplog.text and str(cache.path) in caplog.text
    assert decode_count["files"] == len(paths)
    torch.testing.assert_close(features, expected)
    assert len(FeatureCache(tmp_path / "cache", cache.fingerprint).rows) == len(paths)  # sound again


def test_training_runs_share_the_cache_across_head_settings(data, tmp_path, decode_count):
    settings = dict(data_dir=data, output_dir=tmp_path / "out", img_size=IMG_SIZE, weights="none",
                    backbone="resnet18", epochs=1)
    first = train(TrainConfig(**settings))
    decoded = decode_count["files"]
    second = train(TrainConfig(**{**settings, "lr": 1e-4, "epochs": 2}))
    assert decode_count["files"] == decoded  # the second run decoded nothing
    assert first.metrics["test_accuracy"] >= 0 and len(second.metrics["history"]) == 2


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
