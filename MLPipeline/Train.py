"""Training: the run's settings, the data it trains on, the loop, and the files a run writes.

With the backbone frozen (the original recipe), every epoch would push every image through the same
network and get the same features. So by default the features are computed once, in large inference
batches, and the head trains on them for all epochs: same batches of 8, same Adam, same numbers, a
fraction of the time. `feature_cache=False` runs the original's full forward pass every batch instead.
"""
from __future__ import annotations

import time
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from MLPipeline import Report
from MLPipeline.Common import (UserError, autocast, check_output_dir, log, output_lock, pick_device,
                               progress_reporter)
from MLPipeline.CreateDataset import (MAX_PIXELS, build_index, load_images, make_augmenter, mark_duplicates,
                                      mark_skipped, one_hot, skip_reasons, stratified_split, to_model_input,
                                      usable)
from MLPipeline.ResNet_Model import (BACKBONES, UNFREEZE_CHOICES, Classifier, build_model, checkpoint_dict,
                                     forward_in_batches, prepare_model, save_checkpoint)

MIN_IMG_SIZE = 32  # the ResNet/VGG stems downsample 32x; smaller inputs vanish
MAX_IMG_SIZE = 1024  # beyond this a run would only exhaust memory


def option(default, help: str, valid=None, must: str = "", choices: tuple = (), group: str = "",
           recorded: bool = False):
    """One training option, defined once: the CLI flag (--name-with-dashes), TrainConfig and the checks follow.

    valid(value) -> bool with `must` saying what the value must be; `recorded` options shaped the weights
    and are stored in the checkpoint; `group` places the flag in the CLI's help.
    """
    return field(default=default, metadata={"help": help, "valid": valid, "must": must, "choices": choices,
                                            "group": group, "recorded": recorded})


IMPROVEMENT = "the original's suggested improvements (all off by default)"


@dataclass
class TrainConfig:
    """A training run's settings; the defaults are the original project's recipe."""
    data_dir: Path = option(Path("Data"), "folder of class sub-folders, or a pre-split pair (train/+test/, "
                            "train/+val/, Training_data/+Testing_Data/)")
    output_dir: Path = option(Path("output"), "where model.pt, metrics and plots are written")
    epochs: int = option(10, "passes over the training images", lambda v: v >= 1, "be at least 1", recorded=True)
    batch_size: int = option(8, "training batch size", lambda v: v >= 1, "be at least 1", recorded=True)
    lr: float = option(1e-3, "Adam learning rate of the head", lambda v: v > 0, "be positive", recorded=True)
    img_size: int = option(200, "images are resized to this many pixels a side",
                           lambda v: MIN_IMG_SIZE <= v <= MAX_IMG_SIZE,
                           f"be between {MIN_IMG_SIZE} (the backbone's minimum) and {MAX_IMG_SIZE}")
    test_size: float = option(0.2, "test fraction of each class", lambda v: 0 < v < 1, "be between 0 and 1")
    seed: int = option(42, "seed of the split, the head's initial weights and the shuffling", lambda v: v >= 0,
                       "be 0 or more", recorded=True)
    weights: str = option("auto", "auto (the backbone's ImageNet weights; when they cannot be had, the "
                          "pip-installed ImageNet EfficientNet-Lite0 instead, with a warning) | imagenet (the "
                          "backbone's own, or an error) | none (random init) | PATH to a state dict")
    device: str = option("auto", "auto uses the GPU when PyTorch sees one", choices=("auto", "cpu", "cuda"))
    feature_cache: bool = option(True, "compute a frozen backbone's features once and train the head on them "
                                 "(--no-feature-cache: the full forward pass every batch, like the original; "
                                 "same results, much slower)")
    inference_batch_size: int = option(64, "batch size of feature extraction and scoring", lambda v: v >= 1,
                                       "be at least 1")
    max_pixels: int = option(MAX_PIXELS, "images with more pixels are skipped, unread (a safe limit on memory); "
                             "raise it for big scans", lambda v: v >= 1, "be at least 1")
    dedupe: bool = option(False, "a test (or val) file with the same bytes as a training file is always reported; "
                          "--dedupe also skips it, keeping the training copy")
    backbone: str = option("resnet50", "network to fine-tune", choices=BACKBONES, group=IMPROVEMENT)
    schedule: str = option("none", "cosine: anneal the learning rate to 0 over the epochs",
                           choices=("none", "cosine"), group=IMPROVEMENT, recorded=True)
    augment: bool = option(False, "random crops, small rotations, perspective, brightness/contrast/colour "
                           "jitter on training images (disables the feature cache)", group=IMPROVEMENT,
                           recorded=True)
    flips: bool = option(False, "with --augment, also mirror images; off by default because mirrored text never "
                         "occurs in real photos of documents", group=IMPROVEMENT, recorded=True)
    unfreeze: str = option("none", "also train the backbone's last stage (layer4 on ResNets) or all of it; "
                           "BatchNorm keeps its pretrained statistics", choices=UNFREEZE_CHOICES,
                           group=IMPROVEMENT, recorded=True)
    backbone_lr: float | None = option(None, "learning rate of unfrozen backbone layers (default: --lr / 10)",
                                       lambda v: v is None or v > 0, "be positive", group=IMPROVEMENT,
                                       recorded=True)
    val_size: float = option(0.0, "carve this fraction of each class's training images out as a validation "
                             "set and keep the epoch with the lowest validation loss (the test set is never "
                             "used to choose)", lambda v: 0 <= v < 1, "be 0 (off) or between 0 and 1",
                             group=IMPROVEMENT, recorded=True)

    def check(self) -> None:
        """Raise UserError for settings out of range, before any work is done."""
        for option_field in fields(self):
            check_option(option_field, getattr(self, option_field.name))
        pick_device(self.device)
        check_output_dir(self.output_dir)

    def recorded_settings(self) -> dict:
        """The settings that shaped the weights, as stored in the checkpoint."""
        return {option_field.name: getattr(self, option_field.name) for option_field in fields(self)
                if option_field.metadata["recorded"]}


def check_option(option_field: Field, value) -> None:
    """Raise UserError when `value` breaks the rules of its option (a field of TrainConfig)."""
    rules, flag = option_field.metadata, "--" + option_field.name.replace("_", "-")
    if rules["valid"] and not rules["valid"](value):
        raise UserError(f"{flag} must {rules['must']}, not {value}")
    if rules["choices"] and value not in rules["choices"]:
        raise UserError(f"{flag} must be one of {', '.join(rules['choices'])}, not {value}")


@dataclass
class Split:
    """One split's decoded images (N x S x S x 3 uint8) and class indices; `features` once computed."""
    images: np.ndarray
    labels: torch.Tensor
    features: torch.Tensor | None = None


def load_dataset(config: TrainConfig, device: torch.device) -> tuple[pd.DataFrame, list[str], dict[str, Split]]:
    """Index the data folder, split it, decode every image once; returns (index, classes, splits).

    The index keeps every file with its split and, for files that could not be used, the reason.
    """
    index = build_index(config.data_dir, config.test_size, config.seed)
    if config.val_size:
        index = stratified_split(index, config.val_size, config.seed, to_split="val")
    index = mark_duplicates(index, config.dedupe)
    classes = sorted(index.label.unique())
    images, skipped = load_images(usable(index).path.tolist(), config.img_size, config.max_pixels)
    index = mark_skipped(index, skipped)
    used = usable(index)
    check_enough_left(used, classes, config.val_size > 0)
    split_of = used.split.to_numpy()
    labels = torch.tensor(used.label.map(classes.index).to_numpy(), device=device)
    splits = {name: Split(images[split_of == name], labels[torch.from_numpy(split_of == name).to(device)])
              for name in ("train", "val", "test") if (split_of == name).any()}
    log.info("data: %s images of %d classes (%s), %d skipped; device %s",
             " + ".join(f"{len(split.labels)} {name}" for name, split in splits.items()), len(classes),
             ", ".join(classes), (index.skipped != "").sum(), device)
    return index, classes, splits


def check_enough_left(used: pd.DataFrame, classes: list[str], needs_val: bool) -> None:
    """After skipping bad files, every class still needs a training image, and each split an image."""
    for label in classes:
        if not ((used.label == label) & (used.split == "train")).any():
            raise UserError(f"class '{label}' has no usable training images (after skipping unreadable files)")
    for split in ("test", "val") if needs_val else ("test",):
        if not (used.split == split).any():
            raise UserError(f"the {split} split has no usable images: add images or check the folder layout")
    for label in sorted(set(classes) - set(used.label[used.split == "test"])):
        log.warning("warning: class '%s' has no test images; its precision and recall will read 0", label)


def compute_features(model: Classifier, splits: dict[str, Split], config: TrainConfig,
                     device: torch.device) -> None:
    """A frozen backbone gives each image the same features in every epoch: compute them once per split."""
    model.eval()
    for name, split in splits.items():
        split.features = forward_in_batches(model.features, split.images, device, config.inference_batch_size,
                                            label=f"features ({name})").clone()  # a normal tensor, to train on


def split_logits(model: Classifier, split: Split, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """The model's logits for every image of a split, in eval mode."""
    model.eval()
    if split.features is not None:
        with torch.no_grad():
            return model.head(split.features)
    return forward_in_batches(model, split.images, device, config.inference_batch_size, label="scoring").clone()


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy against one-hot targets, and the fraction of correct argmax predictions."""
    loss = F.cross_entropy(logits, one_hot(labels, logits.shape[1])).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def train_one_epoch(model: Classifier, train: Split, optimizer: torch.optim.Optimizer, config: TrainConfig,
                    device: torch.device, shuffle: torch.Generator, augment=None, label: str = "") -> float:
    """One pass over the training split in shuffled batches; returns the mean training loss."""
    model.train()
    # Batches are drawn as index lists from one seeded generator, so the feature-cache path and the
    # full-forward path see exactly the same batches and their results can be compared.
    order, loss_sum = torch.randperm(len(train.labels), generator=shuffle), 0.0
    update = progress_reporter(label, len(order))
    for first in range(0, len(order), config.batch_size):
        batch = order[first:first + config.batch_size]
        if train.features is not None:  # frozen backbone: the head reads the features computed once
            logits = model.head(train.features[batch.to(device)])
        else:  # the whole network runs on the (augmented) images, as in the original
            images = torch.from_numpy(train.images[batch.numpy()])
            images = to_model_input((augment(images) if augment else images).to(device, non_blocking=True))
            with autocast(device, training=True):
                logits = model(images).float()
        loss = F.cross_entropy(logits, one_hot(train.labels[batch.to(device)], model.head.out_features))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(batch)
        update(first + len(batch))
    return loss_sum / len(order)


def make_optimizer(model: Classifier, config: TrainConfig):
    """Adam for the head at lr and for unfrozen backbone layers at backbone_lr; the optional cosine schedule."""
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": model.head.parameters(), "lr": config.lr},
                                  {"params": backbone_parameters, "lr": config.backbone_lr or config.lr / 10}])
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.schedule == "cosine" else None)
    return optimizer, scheduler


def fit(model: Classifier, splits: dict[str, Split], config: TrainConfig, device: torch.device,
        ) -> tuple[list[dict], int]:
    """The training loop: one line per epoch with train loss and each held-out split's loss and accuracy.

    With a validation split, the weights of the epoch with the lowest validation loss are restored at the
    end; the test split is reported every epoch but never used to choose anything.
    Returns the per-epoch history and the epoch whose weights the model ends with.
    """
    optimizer, scheduler = make_optimizer(model, config)
    augment = make_augmenter(config.img_size, config.flips) if config.augment else None
    shuffle = torch.Generator().manual_seed(config.seed)
    held_out = [name for name in ("val", "test") if name in splits]
    history, start, best = [], time.perf_counter(), BestEpoch()
    for epoch in range(1, config.epochs + 1):
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row["train_loss"] = train_one_epoch(model, splits["train"], optimizer, config, device, shuffle, augment,
                                            label=f"epoch {epoch} training")
        if scheduler:
            scheduler.step()
        for name in held_out:
            logits = split_logits(model, splits[name], config, device)
            row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(logits, splits[name].labels)
        if "val" in splits:
            best.update(epoch, row["val_loss"], model)
        row["elapsed_s"] = round(time.perf_counter() - start, 2)
        history.append(row)
        log.info("epoch %d/%d  train loss %.4f%s  %.1fs", epoch, config.epochs, row["train_loss"],
                 "".join(f"  {name} loss {row[f'{name}_loss']:.4f}  {name} accuracy "
                         f"{100 * row[f'{name}_accuracy']:.2f}%" for name in held_out), row["elapsed_s"])
    return history, best.restore(model) if "val" in splits else config.epochs


class BestEpoch:
    """The weights of the epoch with the lowest validation loss seen so far."""

    def __init__(self):
        self.loss, self.epoch, self.weights = float("inf"), 0, None

    def update(self, epoch: int, val_loss: float, model: Classifier) -> None:
        if val_loss < self.loss:
            self.loss, self.epoch = val_loss, epoch
            self.weights = {key: value.detach().clone() for key, value in model.state_dict().items()}

    def restore(self, model: Classifier) -> int:
        model.load_state_dict(self.weights)
        log.info("kept the weights of epoch %d (lowest validation loss)", self.epoch)
        return self.epoch


@dataclass
class TrainingRun:
    """What train() hands back: the trained model, its metrics, and the test images' final logits."""
    model: Classifier
    classes: list[str]
    metrics: dict
    test_paths: list[str]
    test_logits: torch.Tensor


def train(config: TrainConfig) -> TrainingRun:
    """The whole pipeline: index, decode, build, train, evaluate, then write every output to output_dir.

    The output folder is locked for the run: a second run on it stops at once instead of mixing outputs.
    """
    config.check()
    with output_lock(config.output_dir):
        return run_training(config)


def run_training(config: TrainConfig) -> TrainingRun:
    """train()'s work, once the settings are checked and the output folder is held."""
    device = pick_device(config.device)
    started = time.perf_counter()
    index, classes, splits = load_dataset(config, device)
    timings = {"decode_s": time.perf_counter() - started}

    torch.manual_seed(config.seed)  # the head's initial weights
    model, provenance = build_model(len(classes), config.backbone, config.weights, config.unfreeze)
    model = prepare_model(model, device)
    if config.feature_cache and model.frozen and not config.augment:
        phase = time.perf_counter()
        compute_features(model, splits, config, device)
        timings["features_s"] = time.perf_counter() - phase

    phase = time.perf_counter()
    history, best_epoch = fit(model, splits, config, device)
    timings["train_s"] = time.perf_counter() - phase
    test_logits = split_logits(model, splits["test"], config, device).cpu()
    timings["total_s"] = time.perf_counter() - started

    test_labels = splits["test"].labels.cpu()
    report = Report.classification_report(test_labels.numpy(), test_logits.argmax(1).numpy(), classes)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    metrics = {
        "config": settings, "device": str(device), "torch_version": str(torch.__version__), **provenance,
        "dataset": dataset_summary(index),
        "history": history, "best_epoch": best_epoch,
        "test_accuracy": report["accuracy"], "test_loss": loss_and_accuracy(test_logits, test_labels)[0],
        **{key: value for key, value in report.items() if key != "accuracy"},
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
    }
    checkpoint = checkpoint_dict(model, classes, config.img_size, provenance,
                                 extra={"training": config.recorded_settings()})
    write_training_outputs(Path(config.output_dir), index, metrics, checkpoint)
    log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * report["accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
             provenance["weights_source"], config.output_dir)
    test_paths = usable(index).query("split == 'test'").path.tolist()
    return TrainingRun(model, classes, metrics, test_paths, test_logits)


def dataset_summary(index: pd.DataFrame) -> dict:
    """Images used per class and split, the files skipped with their reasons, and held-out copies of training files."""
    skipped, duplicates = skip_reasons(index), index[index.duplicate_of != ""]
    return {"classes": sorted(index.label.unique()),
            "counts": {label: rows.split.value_counts().sort_index().to_dict()
                       for label, rows in usable(index).groupby("label")},
            "skipped_count": len(skipped), "skipped": skipped,
            "duplicates": dict(zip(duplicates.path, duplicates.duplicate_of))}


def write_training_outputs(output_dir: Path, index: pd.DataFrame, metrics: dict, checkpoint: dict) -> None:
    """split.csv, history.csv, metrics.json, the two plots, and model.pt last; each written atomically."""
    Report.write_csv(output_dir / "split.csv", index)
    history = pd.DataFrame(metrics["history"])
    Report.write_csv(output_dir / "history.csv", history)
    Report.write_json(output_dir / "metrics.json", metrics)
    Report.plot_loss_curve(history, output_dir / "loss_curve.png", Report.backbone_title(metrics))
    Report.plot_confusion_matrix(np.array(metrics["confusion_matrix"]), metrics["classes"],
                                 output_dir / "confusion_matrix.png")
    save_checkpoint(output_dir / "model.pt", checkpoint)
