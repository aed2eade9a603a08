"""ResNet_Model: the backbone and its head, where the starting weights come from, and the checkpoint file.

No test touches the network: the ImageNet weights are stood in for by a random-init ResNet50 state dict
with one tensor changed (so it cannot be mistaken for a fresh random init), placed in a private TORCH_HOME.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from MLPipeline.extras.Common import UserError, atomic_write
from MLPipeline.extras.Checkpoint import REQUIRED, load_checkpoint
from MLPipeline.extras.Weights import build_model
from MLPipeline.ResNet_Model import checkpoint_dict, fast_bf16, save_checkpoint
from MLPipeline.extras.Weights import resolve_weights

IMAGENET = torchvision.models.get_model_weights("resnet50").DEFAULT
IMAGENET_FILE = IMAGENET.url.rsplit("/", 1)[-1]
MARKED = "conv1.weight"  # the tensor changed in the stand-in ImageNet file


def marked_state_dict(arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """A torchvision-format state dict whose first conv holds a pattern no random init produces."""
    state_dict = torchvision.models.get_model(arch, weights=None).state_dict()
    weight = state_dict[MARKED]
    state_dict[MARKED] = torch.linspace(-1, 1, weight.numel()).reshape(weight.shape)
    return state_dict


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "my_resnet50.pth"
    torch.save(marked_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def imagenet_cache(tmp_path_factory, resnet50_file) -> Path:
    """A TORCH_HOME whose hub cache holds the stand-in ImageNet file under torchvision's own file name."""
    torch_home = tmp_path_factory.mktemp("torch_home_with_weights")
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.link(resnet50_file, checkpoints / IMAGENET_FILE)
    return torch_home


@pytest.fixture
def offline(monkeypatch):
    """No name lookups either (the conftest guard refuses connect; DNS could otherwise hang on some hosts)."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "tests must not use the network")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def use_torch_home(monkeypatch, torch_home: Path) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert Path(torch.hub.get_dir()) == torch_home / "hub", "hub dir set explicitly somewhere: TORCH_HOME ignored"
    return torch_home / "hub" / "checkpoints"


def batch(size: int = 64, count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model3():
    """A shared 3-class ResNet50, random init; tests must leave it as they found it."""
    model, provenance = build_model(3, "resnet50", weights="none")
    return model, provenance


# ------------------------------------------------------------------------------------------------ build_model

@pytest.mark.parametrize("num_classes", [2, 3])
def test_head_replaces_the_imagenet_classifier(num_classes):
    model, provenance = build_model(num_classes, "resnet50", weights="none")
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (2048, num_classes)
    assert isinstance(model.backbone.fc, nn.Identity)
    assert provenance["pretrained"] is False


def test_frozen_backbone_and_trainable_head(model3):
    model, _ = model3
    backbone = list(model.backbone.parameters())
    assert backbone and not any(p.requires_grad for p in backbone)
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    try:
        loss = model(batch(64)).logsumexp(dim=1).sum()
        loss.backward()
        assert all(p.grad is None for p in backbone)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_train_mode_keeps_backbone_in_eval(model3):
    model, _ = model3
    batch_norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms
    before = [m.running_mean.clone() for m in batch_norms]
    try:
        assert model.train() is model
        assert model.training and model.head.training
        assert not any(m.training for m in model.backbone.modules())
        with torch.no_grad():
            model(batch(64) * 3 + 2)
        assert all(torch.equal(m.running_mean, old) for m, old in zip(batch_norms, before))  # statistics kept
    finally:
        model.eval()
    assert not model.head.training


@pytest.mark.parametrize("unfreeze", ["last", "all"])
def test_unfrozen_backbone_trains_but_batchnorm_stays_in_eval(unfreeze):
    model, _ = build_model(2, "resnet50", weights="none", unfreeze=unfreeze)
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    layer4 = {f"layer4.{name}" for name, _ in model.backbone.layer4.named_parameters()}
    everything = {name for name, _ in model.backbone.named_parameters()}
    assert trainable == (layer4 if unfreeze == "last" else everything)
    assert layer4 < everything
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert model.head.training and model.backbone.layer4[0].conv1.training
    batch_norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batch_norms and not any(m.training for m in batch_norms)


def test_forward_gives_logits_per_image(model3):
    model, _ = model3
    with torch.no_grad():
        logits = model.eval()(batch(64, count=4))
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # depends on the image


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_gpu_only_where_it_is_native_not_emulated(monkeypatch, native):
    # A T4 or V100 answers is_bf16_supported() True by emulating bf16, which is slower than fp32 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert fast_bf16(torch.device("cuda")) is native


def test_unknown_backbone():
    with pytest.raises(UserError, match="no_such_net"):
        build_model(2, "no_such_net", weights="none")


# -------------------------------------------------------------------------------------------- resolve_weights

def test_weights_none():
    _, state_dict, source, pretrained = resolve_weights("resnet50", "none")
    assert state_dict is None and pretrained is False
    assert "none" in source


@pytest.mark.parametrize("weights", ["auto", "imagenet"])
def test_imagenet_weights_from_the_local_cache(monkeypatch, offline, imagenet_cache, resnet50_file, weights):
    use_torch_home(monkeypatch, imagenet_cache)
    _, state_dict, source, pretrained = resolve_weights("resnet50", weights)
    assert pretrained is True
    assert IMAGENET_FILE in source
    expected = torch.load(resnet50_file, weights_only=True)
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)
    assert torch.equal(state_dict[MARKED], marked_state_dict()[MARKED])


def test_build_model_starts_from_the_cached_weights(monkeypatch, offline, imagenet_cache):
    use_torch_home(monkeypatch, imagenet_cache)
    model, provenance = build_model(2, "resnet50", weights="auto")
    assert provenance["pretrained"] is True
    assert torch.equal(model.backbone.conv1.weight, marked_state_dict()[MARKED])


def test_auto_without_weights_warns_and_falls_back(monkeypatch, offline, tmp_path, caplog):
    cache_dir = use_torch_home(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        arch, state_dict, source, pretrained = resolve_weights("resnet50", "auto")
    assert arch == "efficientnet_lite0" and pretrained is True  # the pip-installed ImageNet backbone
    assert "resnet50 weights unavailable" in source
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert IMAGENET_FILE in warnings
    assert str(cache_dir) in warnings
    assert "--weights" in warnings
    assert not (cache_dir / IMAGENET_FILE).exists()  # no half-download left to be mistaken for weights later


def test_the_download_line_goes_to_stderr_not_stdout(monkeypatch, offline, tmp_path, capsys):
    use_torch_home(monkeypatch, tmp_path)
    resolve_weights("resnet50", "auto")
    captured = capsys.readouterr()
    assert captured.out == "" and f"Downloading: \"{IMAGENET.url}" in captured.err


def test_build_model_auto_offline_records_the_backbone_used(monkeypatch, offline, tmp_path):
    use_torch_home(monkeypatch, tmp_path)
    model, provenance = build_model(2, "resnet50", weights="auto")
    assert provenance["arch"] == "efficientnet_lite0" and provenance["pretrained"] is True
    assert model.head.out_features == 2 and model.head.in_features == 1280


def test_imagenet_without_weights_is_an_error(monkeypatch, offline, tmp_path):
    cache_dir = use_torch_home(monkeypatch, tmp_path)
    with pytest.raises(UserError) as error:
        resolve_weights("resnet50", "imagenet")
    assert IMAGENET_FILE in str(error.value)
    assert str(cache_dir) in str(error.value)


def test_weights_from_a_file(resnet50_file):
    _, state_dict, source, pretrained = resolve_weights("resnet50", str(resnet50_file))
    assert pretrained is True
    assert str(resnet50_file) in source
    assert torch.equal(state_dict[MARKED], marked_state_dict()[MARKED])
    model, provenance = build_model(3, "resnet50", weights=str(resnet50_file))
    assert provenance["pretrained"] is True
    assert torch.equal(model.backbone.conv1.weight, marked_state_dict()[MARKED])


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError) as error:
        resolve_weights("resnet50", str(missing))
    assert str(missing) in str(error.value)


def test_weights_for_another_architecture(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="resnet50"):
        build_model(2, "resnet50", weights=str(path))


def test_our_own_checkpoint_is_not_a_weights_file(tmp_path, model3):
    model, provenance = model3
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_dict(model, ["a", "b", "c"], 64, provenance))
    with pytest.raises(UserError):
        build_model(3, "resnet50", weights=str(path))


def test_crafted_pickle_in_the_weights_cache_is_not_run(monkeypatch, offline, tmp_path):
    marker = tmp_path / "code_ran"
    cache_dir = use_torch_home(monkeypatch, tmp_path)
    cache_dir.mkdir(parents=True)
    torch.save({"conv1.weight": CreatesMarker(marker)}, cache_dir / IMAGENET_FILE)
    try:
        used = resolve_weights("resnet50", "auto")[0]
    except UserError:
        used = None
    assert not marker.exists(), "loading the cached weights file ran code from it"
    assert used != "resnet50"  # the crafted file was not taken for ResNet50's weights


# ----------------------------------------------------------------------------------------------- checkpoints

class CreatesMarker:
    """Unpickling this creates a file: proof that loading ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plain_values_only(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_values_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain_values_only(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3-class model with non-default head and BatchNorm statistics, saved once; (path, model, classes)."""
    model, provenance = build_model(3, "resnet50", weights="none")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        model.head.weight.normal_(generator=generator)
    classes = ["driving_licence", "others", "social_security"]
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(path, checkpoint_dict(model, classes, 48, provenance, training={"epochs": 2}))
    return path, model.eval(), classes


def test_checkpoint_round_trip(saved):
    path, model, classes = saved
    loaded, checkpoint = load_checkpoint(path)
    assert not loaded.training
    assert checkpoint["classes"] == classes
    assert checkpoint["img_size"] == 48
    assert checkpoint["arch"] == "resnet50"
    assert checkpoint["pretrained"] is False
    assert checkpoint["training"]["epochs"] == 2
    images = batch(48, count=3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=1e-5, atol=1e-5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_is_plain_data(saved):
    path, _, classes = saved
    raw = torch.load(path, weights_only=True)
    assert {"state_dict", *REQUIRED} <= raw.keys()
    assert plain_values_only(raw)
    assert raw["classes"] == classes
    assert raw["head"]["out_features"] == len(classes)


def test_saving_leaves_only_the_file(tmp_path, saved):
    _, model, classes = saved
    target = tmp_path / "new_folder" / "model.pt"
    checkpoint = checkpoint_dict(model, classes, 48, {"arch": "resnet50", "weights_source": "x", "pretrained": True})
    save_checkpoint(target, checkpoint)
    assert os.listdir(target.parent) == ["model.pt"]
    save_checkpoint(target, {**checkpoint, "img_size": 64})  # overwrite in place
    assert os.listdir(target.parent) == ["model.pt"]
    assert torch.load(target, weights_only=True)["img_size"] == 64


@pytest.mark.parametrize("written", [0, 5, 1000])
def test_failed_write_keeps_the_previous_file(tmp_path, written):
    target = tmp_path / "model.pt"
    target.write_bytes(b"the previous model")

    def fails_midway(temp_name):
        with open(temp_name, "wb") as handle:
            handle.write(b"X" * written)
        raise KeyboardInterrupt  # an interrupted run, not just an error

    with pytest.raises(KeyboardInterrupt), atomic_write(target) as temp_name:
        fails_midway(temp_name)
    assert target.read_bytes() == b"the previous model"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_saved_files_get_the_usual_permissions_not_owner_only(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out.json") as temp_name:
            Path(temp_name).write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "model.pt")


@pytest.mark.parametrize("damage", ["empty", "first-half", "last-byte-missing", "zeros"])
def test_damaged_checkpoint(tmp_path, saved, damage):
    data = saved[0].read_bytes()
    damaged = {"empty": b"", "first-half": data[:len(data) // 2], "last-byte-missing": data[:-1],
               "zeros": bytes(4096)}[damage]
    path = tmp_path / "model.pt"
    path.write_bytes(damaged)
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


GARBAGE = {
    "url-text": b"https://example.com/model.pt\n",
    "error-text": b"error: 404 not found\n",
    "random-bytes": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3),
                                        dtype=torch.uint8).tolist()),
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("loader", ["checkpoint", "weights"])
def test_garbage_file_is_not_a_model(tmp_path, content, loader):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        if loader == "checkpoint":
            load_checkpoint(path)
        else:
            build_model(2, "resnet50", weights=str(path))


def test_dict_without_our_keys(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3), "note": "someone else's file"}, path)
    with pytest.raises(UserError, match="not a model file"):
        load_checkpoint(path)


def test_checkpoint_missing_one_key(tmp_path, saved):
    checkpoint = torch.load(saved[0], weights_only=True)
    del checkpoint["classes"]
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="classes"):
        load_checkpoint(path)


def test_state_dict_of_another_architecture(tmp_path):
    model18, provenance = build_model(3, "resnet18", weights="none")
    checkpoint = checkpoint_dict(model18, ["a", "b", "c"], 48, {**provenance, "arch": "resnet50"})  # claims resnet50
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint)
    with pytest.raises(UserError, match="resnet50"):
        load_checkpoint(path)


def test_class_count_does_not_match_the_head(tmp_path, saved):
    checkpoint = torch.load(saved[0], weights_only=True)
    checkpoint["classes"] = checkpoint["classes"] + ["extra"]
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="4 classes"):
        load_checkpoint(path)


@pytest.mark.parametrize("how", ["torch.save", "torch.save-legacy", "pickle"])
def test_crafted_pickle_is_refused_and_not_run(tmp_path, saved, how):
    marker = tmp_path / "code_ran"
    checkpoint = torch.load(saved[0], weights_only=True)
    checkpoint["classes"] = CreatesMarker(marker)
    path = tmp_path / "model.pt"
    if how == "pickle":
        with open(path, "wb") as handle:
            pickle.dump({key: value for key, value in checkpoint.items() if key != "state_dict"}, handle, protocol=2)
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=how == "torch.save")
    with pytest.raises(UserError):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(UserError):
        build_model(2, "resnet50", weights=str(path))  # the weights-file path is guarded the same way
    assert not marker.exists()
