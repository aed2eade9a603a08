"""Training: train(config) is the whole recipe, top to bottom; its settings are TrainConfig, below.

With the backbone frozen (the original recipe) every epoch would give each image the same features, so the
backbone sees each image once and the head trains on its features: the same batches, Adam and loss, in a
fraction of the time. Everything else the tool can do (a disk cache of the features, torchrun, augmentation,
unfrozen layers, calibration, cross-validation, ...) lives in MLPipeline/extras and calls these pieces.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from MLPipeline.CreateDataset import CreateDataset, UserError, build_index, image_batches, index_folder, load_image
from MLPipeline.ResNet_Model import (Classifier, atomic_write, build_model, checkpoint_dict, fast_bf16,
                                     forward_batches, inference_batch_size, save_checkpoint, torchvision_backbone)

log = logging.getLogger("MLPipeline")


@dataclass
class TrainConfig:
    """A training run's settings; the defaults are the original project's recipe."""
    data_dir: Path = Path("Data")  # one sub-folder per class, or a pre-split pair (Training_data/ + Testing_Data/)
    output_dir: Path = Path("output")  # model.pt, metrics.json (and, from engine.py, the CSVs and plots)
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3  # Adam's learning rate
    img_size: int = 200  # images are squashed to img_size x img_size
    test_size: float = 0.2  # of each class, drawn with the seed (a pre-split folder keeps its own)
    seed: int = 42  # the split, the head's first weights, the order of the batches
    backbone: str = "resnet50"
    weights: str = "auto"  # ImageNet (auto: as engine.py's weights policy; the recipe's own: torchvision's) | none
    device: str = "auto"  # the GPU when PyTorch sees one
    precision: str = "auto"  # auto: the backbone in bfloat16 where the hardware computes it natively | fp32
    workers: int = min(4, os.cpu_count() or 1)  # processes decoding while the backbone runs (0: none)

    def __post_init__(self):
        self.data_dir, self.output_dir = Path(self.data_dir), Path(self.output_dir)


@dataclass
class TrainingRun:
    """What train() hands back: the trained model, its classes, metrics, index, and the test images' paths and
    logits, in the same order."""
    model: Classifier
    classes: list[str]
    metrics: dict
    index: pd.DataFrame
    test_paths: list[str]
    test_logits: torch.Tensor


def train(config: TrainConfig, index_folder=index_folder, load_image=load_image,
          load_backbone=torchvision_backbone, save=None) -> TrainingRun:
    """The recipe; writes config.output_dir/metrics.json, then model.pt. The last four arguments are the
    recipe's plain ways to walk a folder, decode a file, get ImageNet weights and save; engine.py hands in the
    tool's (odd folders and files, every image format, a pretrained backbone offline, a model.pt that also
    knows its training images, to flag inputs unlike them)."""
    started, device = time.perf_counter(), pick_device(config.device)
    # 1. Index: a row per file (path, label, split, why it is skipped), the class being its folder.
    index = build_index(config.data_dir, config.test_size, config.seed, index_folder)
    classes = sorted(index[index.skipped == ""].label.unique())
    # 2. The model: an ImageNet backbone, frozen, and a new linear head for our classes.
    torch.manual_seed(config.seed)  # the head's first weights
    model, provenance = build_model(len(classes), config.backbone, config.weights, load_backbone)
    model = model.to(device, memory_format=torch.channels_last).eval()  # eval: BatchNorm keeps its statistics
    # 3. Features: the frozen backbone sees each image once; a file that does not decode is skipped, named.
    index, data = compute_features(model, index, classes, config, device, load_image)
    timings = {"data_s": round(time.perf_counter() - started, 2)}
    # 4. Train the head: Adam on cross-entropy against one-hot targets, batches in a seeded order.
    optimizer = torch.optim.Adam(model.head.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    train_batches = DataLoader(data["train"], config.batch_size, shuffle=True, generator=order)
    test_batches = DataLoader(data["test"], 256)
    history = []
    for epoch in range(1, config.epochs + 1):
        train_loss = train_one_epoch(model.head.train(), train_batches, optimizer, device)
        test_logits, test_labels = score(model.head, test_batches, device)  # 5. the test score, every epoch
        test_loss, test_accuracy = loss_and_accuracy(test_logits, test_labels)
        history.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                        "test_accuracy": test_accuracy})
        log.info("epoch %d/%d  train loss %.4f  test loss %.4f  test accuracy %.2f%%", epoch, config.epochs,
                 train_loss, test_loss, 100 * test_accuracy)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    # 6. The outputs: metrics.json, then model.pt, each replaced whole.
    metrics = run_metrics(config, device, provenance, index, history, test_logits, test_labels, classes, timings)
    checkpoint = checkpoint_dict(model, classes, config.img_size, provenance, training=dict(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed, precision=config.precision))
    (save or save_outputs)(config.output_dir, metrics, checkpoint, data)
    log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * metrics["test_accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
             provenance["weights_source"], config.output_dir)
    test_paths = index[(index.skipped == "") & (index.split == "test")].path.tolist()
    return TrainingRun(model, classes, metrics, index, test_paths, test_logits)


def train_one_epoch(network, batches, optimizer: torch.optim.Optimizer, device: torch.device,
                    weight: torch.Tensor | None = None) -> float:
    """One pass over batches of (inputs, one-hot targets, ...); returns the mean training loss.
    weight: each class's weight in the loss (extras: --class-weights), None for all alike."""
    loss_sum, seen = 0.0, 0
    for inputs, targets, *_ in batches:
        logits = network(inputs.to(device, non_blocking=True)).float()
        loss = F.cross_entropy(logits, targets.to(device, non_blocking=True), weight)  # one-hot, as the original
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + loss.item() * len(inputs), seen + len(inputs)
    return loss_sum / max(1, seen)


def compute_features(model: Classifier, index: pd.DataFrame, classes: list[str], config: TrainConfig,
                     device: torch.device, load_image=load_image) -> tuple[pd.DataFrame, dict[str, Subset]]:
    """Each split's (features, one-hot targets), the backbone run once over every usable file, batch by
    batch; returns the index with why each file that did not decode was skipped, and the datasets."""
    rows = index[index.skipped == ""]
    batch_size = inference_batch_size(device, config.img_size)
    batches = image_batches(rows.path.tolist(), config.img_size, batch_size, config.workers,
                            load_image=load_image, pin_memory=device.type == "cuda")
    bf16 = config.precision == "auto" and fast_bf16(device)
    features, _, read, failed = forward_batches(model.features, batches, device, bf16, "features")
    index = index.assign(skipped=index.skipped.mask(index.path.isin(list(failed)), index.path.map(failed)))
    rows = rows.iloc[read]
    check_enough_left(rows, classes)
    log.info("data: %d train + %d test images of %d classes (%s), %d skipped; device %s%s",
             (rows.split == "train").sum(), (rows.split == "test").sum(), len(classes), ", ".join(classes),
             (index.skipped != "").sum(), device, ", bfloat16" if bf16 else "")
    one_hot = F.one_hot(torch.tensor(rows.label.map(classes.index).to_numpy()), len(classes)).float()
    table = TensorDataset(features, one_hot)  # each split a Subset of it: the features are never copied
    return index, {split: Subset(table, np.flatnonzero(rows.split == split).tolist())
                   for split in ("train", "test")}


def check_enough_left(used: pd.DataFrame, classes: list[str], held_out: tuple[str, ...] = ("test",)) -> None:
    """After skipping the files that did not decode, each class still needs a training image, and each
    held-out split an image; a class without test images is a warning."""
    for label in classes:
        if not ((used.label == label) & (used.split == "train")).any():
            raise UserError(f"class '{label}' has no usable training images (after skipping unreadable files)")
    for split in held_out:
        if not (used.split == split).any():
            raise UserError(f"the {split} split has no usable images: add images or check the folder layout")
    for label in sorted(set(classes) - set(used.label[used.split == "test"])):
        log.warning("warning: class '%s' has no test images; its test precision and recall will read 0", label)


def score(network, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's logits (eval mode, on the CPU) for every batch, and the class indices of their targets."""
    logits, targets, *_ = forward_batches(network.eval(), batches, device, label="scoring")
    return logits, targets.argmax(1)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy, and the fraction of correct argmax predictions."""
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def pick_device(name: str) -> torch.device:
    """'auto' = the GPU when there is one; asking for CUDA without one is a user error."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def run_metrics(config: TrainConfig, device: torch.device, provenance: dict, index: pd.DataFrame,
                history: list[dict], logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                timings: dict) -> dict:
    """metrics.json: the settings, device and backbone, the images used and skipped, the test report."""
    used, skipped = index[index.skipped == ""], index[index.skipped != ""]
    loss, accuracy = loss_and_accuracy(logits, labels)
    return {"config": json.loads(json.dumps(asdict(config), default=str)),  # paths as text
            "device": str(device), "torch_version": str(torch.__version__), **provenance,
            "dataset": {"classes": classes, "counts": pd.crosstab(used.label, used.split).to_dict("index"),
                        "skipped_count": len(skipped), "skipped": dict(zip(skipped.path, skipped.skipped))},
            "test_accuracy": accuracy, "test_loss": loss, "classes": classes,
            "confusion_matrix": confusion_matrix(labels, logits.argmax(1), len(classes)).tolist(),
            "history": history, "timings_s": timings}


def confusion_matrix(labels, predicted, num_classes: int) -> np.ndarray:
    """How many images of each true class (rows) were predicted as each class (columns)."""
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(confusion, (np.asarray(labels), np.asarray(predicted)), 1)
    return confusion


def save_outputs(output_dir: Path, metrics: dict, checkpoint: dict, data: dict | None = None) -> None:
    """metrics.json, then model.pt last: a run stopped before here leaves the previous model in place.
    data (each split's features) is for a save that stores more; the recipe's needs none."""
    with atomic_write(Path(output_dir) / "metrics.json") as temp_name:
        Path(temp_name).write_text(json.dumps(metrics, indent=2) + "\n", errors="surrogateescape")
    save_checkpoint(Path(output_dir) / "model.pt", checkpoint)


# --- The original project's entry point (see docs/original-project.md)

def TrainRestNet(model: Classifier, trainloader, testloader, epochs: int = 10, lr: float = 1e-3,
                 classes: list[str] | None = None, output_dir: str | Path = "output",
                 device: str = "auto") -> list[dict]:
    """The original's training call on the recipe's loop: a line per epoch, then output_dir/model.pt. model: from
    ResNET_Model().model_builder(); loaders of (N x 3 x S x S images in [0, 1], N x C one-hot labels); classes:
    the class names (default: those of the create_dataset calls). Returns one row per epoch."""
    if not hasattr(model, "provenance"):
        raise UserError("TrainRestNet needs the model from ResNET_Model().model_builder(), which records where "
                        "its weights came from")
    classes = CreateDataset.last_classes() if classes is None else list(classes)
    if classes is None or len(classes) != model.head.out_features:
        raise UserError(f"the model has {model.head.out_features} outputs but the class names known are "
                        f"{classes}: pass TrainRestNet(..., classes=[one name per one-hot column])")
    target = pick_device(device)
    model = model.to(target, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=lr)
    history = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "train_loss": train_one_epoch(model.train(), trainloader, optimizer, target)}
        row["test_loss"], row["test_accuracy"] = loss_and_accuracy(*score(model, testloader, target))
        history.append(row)
        # print, as the original did: a bare script sets up no logging, so log.info would show nothing
        print(f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
              f"test accuracy {100 * row['test_accuracy']:.2f}%")
    img_size = next(iter(testloader))[0].shape[-1]
    path = Path(output_dir) / "model.pt"
    save_checkpoint(path, checkpoint_dict(model, classes, img_size, model.provenance, training={
        "epochs": epochs, "lr": lr, "batch_size": getattr(trainloader, "batch_size", None)}))
    print(f"test accuracy {100 * history[-1]['test_accuracy']:.2f}%; model saved to {path}")
    return history
