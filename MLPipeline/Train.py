"""Training: the run's settings, the data it trains on, the loop, and the files a run writes.

With the backbone frozen (the original recipe), every epoch would push every image through the same
network and get the same features. So by default the features are computed once, in large inference
batches, and the head trains on them for all epochs: same batches of 8, same Adam, same numbers, a
fraction of the time. `feature_cache=False` runs the original's full forward pass every batch instead.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from MLPipeline import Report
from MLPipeline.Common import (UserError, autocast, check_output_dir, gather, is_main_process, log, output_lock,
                               pick_device, progress_reporter, shard, start_distributed, world)
from MLPipeline.CreateDataset import (MAX_PIXELS, build_index, decode_to_disk, make_augmenter, mark_duplicates,
                                      mark_skipped, one_hot, skip_reasons, stratified_split, to_model_input, usable)
from MLPipeline.Export import BACKBONE_RUNTIMES, FrozenBackbone
from MLPipeline.FeatureCache import FeatureCache, backbone_fingerprint, extract_features
from MLPipeline.ResNet_Model import (BACKBONES, UNFREEZE_CHOICES, Classifier, build_model, checkpoint_dict,
                                     forward_in_batches, prepare_model, save_checkpoint)

MIN_IMG_SIZE = 32  # the ResNet/VGG stems downsample 32x; smaller inputs vanish
MAX_IMG_SIZE = 1024  # beyond this a run would only exhaust memory


def option(default, help: str, valid=None, must: str = "", choices: tuple = (), group: str = "",
           recorded: bool = False, kind: type | None = None):
    """One training option, defined once: the CLI flag (--name-with-dashes), TrainConfig and the checks follow.

    valid(value) -> bool with `must` saying what the value must be; `recorded` options shaped the weights
    and are stored in the checkpoint; `group` places the flag in the CLI's help; `kind` is the value's type
    (by default the default's).
    """
    return field(default=default, metadata={"help": help, "valid": valid, "must": must, "choices": choices,
                                            "group": group, "recorded": recorded,
                                            "kind": kind or type(default)})


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
    inference_batch_size: int | None = option(None, "batch size of feature extraction and scoring (default: 64 "
                                              "on a GPU; on the CPU 8 at 200 px, more for smaller images)",
                                              lambda v: v is None or v >= 1, "be at least 1", kind=int)
    backbone_runtime: str = option("auto", "what runs a frozen backbone on the CPU: auto (a run of 500 images or "
                                   "more tries ONNX Runtime on its first batch and keeps the faster), pytorch, "
                                   "onnxruntime", choices=BACKBONE_RUNTIMES)
    cache_dir: Path | None = option(None, "where a frozen backbone's features are kept between runs, and "
                                    "decoded images during one (default: OUTPUT_DIR/cache)", kind=Path)
    workers: int = option(min(4, os.cpu_count() or 1), "worker processes that read and augment images when "
                          "training reads them every epoch (0: the main process)", lambda v: v >= 0, "be 0 or more")
    max_pixels: int = option(MAX_PIXELS, "images with more pixels are skipped, unread (a safe limit on memory); "
                             "raise it for big scans", lambda v: v >= 1, "be at least 1")
    dedupe: bool = option(False, "a test (or val) file with the same bytes as a training file is always reported; "
                          "--dedupe also skips it, keeping the training copy")
    backbone: str = option("resnet50", "network to fine-tune", choices=BACKBONES, group=IMPROVEMENT)
    schedule: str = option("none", "cosine: anneal the learning rate to 0 over the epochs",
                           choices=("none", "cosine"), group=IMPROVEMENT, recorded=True)
    augment: bool = option(False, "random crops, small rotations, perspective, brightness/contrast/colour "
                           "jitter on training images (the backbone then runs on every training batch)",
                           group=IMPROVEMENT, recorded=True)
    flips: bool = option(False, "with --augment, also mirror images; off by default because mirrored text never "
                         "occurs in real photos of documents", group=IMPROVEMENT, recorded=True)
    unfreeze: str = option("none", "also train the backbone's last stage (layer4 on ResNets) or all of it; "
                           "BatchNorm keeps its pretrained statistics", choices=UNFREEZE_CHOICES,
                           group=IMPROVEMENT, recorded=True)
    backbone_lr: float | None = option(None, "learning rate of unfrozen backbone layers (default: --lr / 10)",
                                       lambda v: v is None or v > 0, "be positive", group=IMPROVEMENT,
                                       recorded=True, kind=float)
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
    """One split's class indices and what the model reads for it, decoded once."""
    labels: torch.Tensor
    features: torch.Tensor | None = None  # frozen backbone: N x D features, on the device
    images: np.ndarray | None = None  # otherwise: N x S x S x 3 uint8, memory-mapped from disk


def index_dataset(config: TrainConfig) -> pd.DataFrame:
    """Every image file with its label and split (train, test and, with --val-size, val)."""
    index = build_index(config.data_dir, config.test_size, config.seed)
    if config.val_size:
        index = stratified_split(index, config.val_size, config.seed, to_split="val")
    return mark_duplicates(index, config.dedupe)


def load_splits(config: TrainConfig, index: pd.DataFrame, classes: list[str], model: Classifier, arch: str,
                device: torch.device, backbone: FrozenBackbone) -> tuple[pd.DataFrame, dict[str, Split]]:
    """Decode each split once: into features, when the backbone is frozen (and the feature cache on), or
    into a file on disk, when training reads the images every epoch (augmentation, unfrozen layers).

    Returns the index with each unusable file's reason in `skipped`, and the splits.
    """
    cache_dir = Path(config.cache_dir or Path(config.output_dir) / "cache")
    with_features = model.frozen and config.feature_cache
    cache = FeatureCache(cache_dir, backbone_fingerprint(model, arch, config.img_size)) if with_features else None
    splits, skipped = {}, {}
    for name in ("train", "val", "test"):
        rows = usable(index[index.split == name])  # files already skipped (not images, duplicates): not read
        if rows.empty:
            continue
        paths = rows.path.tolist()
        if with_features and not (name == "train" and config.augment):
            features, positions, bad = features_of_every_shard(model, paths, config, device, cache, backbone)
            inputs = {"features": features.to(device)}
        else:  # augmented images differ every epoch: the backbone must see each one
            images, positions, bad = decode_to_disk(paths, config.img_size, cache_dir, config.max_pixels)
            inputs = {"images": images}
        labels = torch.tensor(rows.label.iloc[positions].map(classes.index).to_numpy(), device=device)
        splits[name], skipped = Split(labels, **inputs), {**skipped, **bad}
    index = mark_skipped(index, skipped)
    check_enough_left(usable(index), classes, config.val_size > 0)
    if cache and len(cache.rows) > cache.loaded and is_main_process():  # a run that stops here writes nothing
        cache.save()
    log.info("data: %s images of %d classes (%s), %d skipped; device %s",
             " + ".join(f"{len(split.labels)} {name}" for name, split in splits.items()), len(classes),
             ", ".join(classes), (index.skipped != "").sum(), device)
    return index, splits


def features_of_every_shard(model: Classifier, paths: list[str], config: TrainConfig, device: torch.device,
                            cache: FeatureCache | None, backbone: FrozenBackbone,
                            ) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """extract_features for this process's shard of `paths`, then everyone's, gathered in the files' order:
    under torchrun each process decodes and runs the backbone on 1/N of the images, and the head then
    trains on all the features in every process, exactly as in one process."""
    mine = shard(paths)
    features, positions, skipped = extract_features(model, [paths[i] for i in mine], config.img_size, device,
                                                    config.inference_batch_size, cache, config.max_pixels, backbone)
    parts = gather((features.cpu(), [mine[p] for p in positions], skipped))
    if len(parts) > 1:  # in one process the features are in order already: no second copy of them
        positions = [position for _, shard_positions, _ in parts for position in shard_positions]
        order = np.argsort(positions, kind="stable")
        features = torch.cat([part_features for part_features, _, _ in parts])[torch.from_numpy(order)]
        positions = [positions[i] for i in order]
    if cache:
        cache.update(paths, positions, features)
    return features, positions, {path: reason for _, _, bad in parts for path, reason in bad.items()}


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


class ShuffledBatches:
    """Each epoch, a split's positions in a new order from one seeded generator, cut into batches.

    Batches are drawn as positions, not by a DataLoader's own shuffling, so that the feature-cache path and
    the image path see exactly the same batches and their results can be compared.
    """

    def __init__(self, size: int, batch_size: int, seed: int, sharded: bool = False):
        self.size, self.batch_size, self.sharded = size, batch_size, sharded
        self.generator = torch.Generator().manual_seed(seed)  # the same order in every process

    def __iter__(self):
        # A generator: the order is drawn when iteration starts, not when a DataLoader merely calls iter()
        # (it does so twice when it starts its workers).
        batches = torch.randperm(self.size, generator=self.generator).split(self.batch_size)
        rank, size = world() if self.sharded else (0, 1)
        # Sharded (DDP), each process takes every size-th batch, and all take the same number of steps,
        # since gradients are averaged at each: the last ones wrap round to the first batches.
        yield from (batches[(rank + step * size) % len(batches)].tolist() for step in range(len(self)))

    def __len__(self) -> int:
        batches = -(-self.size // self.batch_size)
        return -(-batches // world()[1]) if self.sharded else batches


class TrainImages(torch.utils.data.Dataset):
    """The training split's images, read from disk and augmented in the DataLoader's worker processes."""

    def __init__(self, images: np.ndarray, augment=None):
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (the DataLoader asks for it so): one read and one augmentation call."""
        images = torch.from_numpy(np.asarray(self.images[positions]))
        return list(zip(self.augment(images) if self.augment else images, positions))


def training_batches(train: Split, config: TrainConfig, device: torch.device):
    """A function giving each epoch's (positions, images) batches; images is None on the features path.

    Under torchrun the features path trains on every batch in every process (the same steps everywhere, so
    the same head); the images path gives each process its share of the batches (DDP).
    """
    batches = ShuffledBatches(len(train.labels), config.batch_size, config.seed, sharded=train.features is None)
    if train.features is not None:
        return lambda: ((torch.tensor(positions), None) for positions in batches)
    augment = make_augmenter(config.img_size, config.flips) if config.augment else None
    loader = torch.utils.data.DataLoader(TrainImages(train.images, augment), batch_sampler=batches,
                                         num_workers=config.workers, persistent_workers=config.workers > 0,
                                         pin_memory=device.type == "cuda")
    return lambda: ((positions, images) for images, positions in loader)


def train_one_epoch(model: Classifier, network: Callable[[torch.Tensor], torch.Tensor], train: Split, batches,
                    optimizer: torch.optim.Optimizer, device: torch.device, label: str = "") -> float:
    """One pass over the training split; returns the mean training loss (over every process's batches).

    network: what a batch of images runs through (images_network()); the features path uses the head alone.
    """
    model.train()
    loss_sum, seen, update = 0.0, 0, progress_reporter(label, len(train.labels))
    for positions, images in batches:
        positions = positions.to(device)
        if images is None:  # frozen backbone: the head reads the features computed once
            logits = model.head(train.features[positions])
        else:  # the network runs on the (augmented) images, as in the original
            with autocast(device, training=True):
                logits = network(to_model_input(images.to(device, non_blocking=True))).float()
        loss = F.cross_entropy(logits, one_hot(train.labels[positions], model.head.out_features))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + loss.item() * len(positions), seen + len(positions)
        update(seen)
    totals = gather((loss_sum, seen)) if train.features is None else [(loss_sum, seen)]
    return sum(total for total, _ in totals) / sum(count for _, count in totals)


def make_optimizer(model: Classifier, config: TrainConfig):
    """Adam for the head at lr and for unfrozen backbone layers at backbone_lr; the optional cosine schedule."""
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": model.head.parameters(), "lr": config.lr},
                                  {"params": backbone_parameters, "lr": config.backbone_lr or config.lr / 10}])
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.schedule == "cosine" else None)
    return optimizer, scheduler


def images_network(model: Classifier, backbone: FrozenBackbone, device: torch.device,
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a training batch of images runs through: the whole model or, with the backbone frozen, the
    backbone's features (in the runtime FrozenBackbone chose) into the head. Under torchrun what trains is
    wrapped in DistributedDataParallel, which averages the processes' gradients at each step."""
    trained = model.head if model.frozen else model
    if world()[1] > 1:  # the head has no buffers; the backbone's BatchNorm keeps its statistics: none to sync
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device] if device.type == "cuda" else None,
            **({} if model.frozen else {"broadcast_buffers": False}))
    return (lambda images: trained(backbone(images))) if model.frozen else trained


def fit(model: Classifier, splits: dict[str, Split], config: TrainConfig, device: torch.device,
        backbone: FrozenBackbone) -> tuple[list[dict], int]:
    """The training loop: one line per epoch with train loss and each held-out split's loss and accuracy.

    With a validation split, the weights of the epoch with the lowest validation loss are restored at the
    end; the test split is reported every epoch but never used to choose anything.
    Returns the per-epoch history and the epoch whose weights the model ends with.
    """
    optimizer, scheduler = make_optimizer(model, config)
    epoch_batches = training_batches(splits["train"], config, device)
    network = images_network(model, backbone, device) if splits["train"].features is None else None
    held_out = [name for name in ("val", "test") if name in splits]
    history, start, best = [], time.perf_counter(), BestEpoch()
    for epoch in range(1, config.epochs + 1):
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row["train_loss"] = train_one_epoch(model, network, splits["train"], epoch_batches(), optimizer, device,
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
    device = start_distributed(pick_device(config.device))  # under torchrun: join the job first
    with output_lock(config.output_dir) if is_main_process() else contextlib.nullcontext():  # rank 0 writes
        return run_training(config, device)


def run_training(config: TrainConfig, device: torch.device) -> TrainingRun:
    """train()'s work, once the settings are checked and the output folder is held."""
    started = time.perf_counter()
    index = index_dataset(config)
    classes = sorted(index.label.unique())
    torch.manual_seed(config.seed)  # the head's initial weights
    model, provenance = build_model(len(classes), config.backbone, config.weights, config.unfreeze)
    model = prepare_model(model, device)
    backbone = FrozenBackbone(model, device, config.backbone_runtime, images=backbone_passes(config, index))
    index, splits = load_splits(config, index, classes, model, provenance["arch"], device, backbone)
    timings = {"data_s": time.perf_counter() - started}  # decoding, and features where the backbone is frozen

    phase = time.perf_counter()
    history, best_epoch = fit(model, splits, config, device, backbone)
    timings["train_s"] = time.perf_counter() - phase
    test_logits = split_logits(model, splits["test"], config, device).cpu()
    timings["total_s"] = time.perf_counter() - started

    test_labels = splits["test"].labels.cpu()
    report = Report.classification_report(test_labels.numpy(), test_logits.argmax(1).numpy(), classes)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    metrics = {
        "config": settings, "device": str(device), "torch_version": str(torch.__version__), **provenance,
        "dataset": dataset_summary(index),
        "trained_on": "features" if splits["train"].features is not None else "images",
        "backbone_runtime": backbone.name if model.frozen else "pytorch",
        "history": history, "best_epoch": best_epoch,
        "test_accuracy": report["accuracy"], "test_loss": loss_and_accuracy(test_logits, test_labels)[0],
        **{key: value for key, value in report.items() if key != "accuracy"},
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
    }
    checkpoint = checkpoint_dict(model, classes, config.img_size, provenance,
                                 extra={"training": config.recorded_settings()})
    if is_main_process():
        write_training_outputs(Path(config.output_dir), index, metrics, checkpoint)
    log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * report["accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
             provenance["weights_source"], config.output_dir)
    test_paths = usable(index).query("split == 'test'").path.tolist()
    return TrainingRun(model, classes, metrics, test_paths, test_logits)


def backbone_passes(config: TrainConfig, index: pd.DataFrame) -> int:
    """About how many images a run pushes through its backbone: each once or, when training reads the
    images every epoch, each every epoch."""
    return len(usable(index)) * (config.epochs if config.augment or not config.feature_cache else 1)


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


# --- The original project's entry points (see README: Coming from the original project)

from MLPipeline.CreateDataset import CreateDataset  # noqa: E402 (kept with the entry points it serves)


def TrainRestNet(model: Classifier, trainloader, testloader, epochs: int = 10, lr: float = 1e-3,
                 classes: list[str] | None = None, output_dir: str | Path = "output",
                 device: str = "auto") -> list[dict]:
    """The original's training call: Adam, cross-entropy on one-hot targets, a line per epoch with the loss
    and test accuracy, then output_dir/model.pt in this project's checkpoint format.

    model: from ResNET_Model().model_builder() (it carries its weights' provenance). The loaders yield
    (N x 3 x S x S images in [0, 1], N x C one-hot labels), as built from create_dataset's arrays; every batch
    runs through the whole network, as in the original. classes: the checkpoint's class names, by default
    those of the last create_dataset call. Returns one row per epoch: train loss, test loss, test accuracy.
    """
    config = TrainConfig(output_dir=Path(output_dir), epochs=epochs, lr=lr, device=device)
    config.check()
    img_size = check_batches(model, trainloader, testloader)
    classes = checked_classes(classes, model.head.out_features)
    target = pick_device(device)
    model = prepare_model(model, target)
    optimizer, _ = make_optimizer(model, config)
    history = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "train_loss": train_loader_epoch(model, trainloader, optimizer, target)}
        row["test_loss"], row["test_accuracy"] = loss_and_accuracy(*loader_logits(model, testloader, target))
        history.append(row)
        # print, as the original did: a bare script sets up no logging, so log.info would show nothing
        print(f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
              f"test accuracy {100 * row['test_accuracy']:.2f}%")
    settings = {"epochs": epochs, "lr": lr, "batch_size": getattr(trainloader, "batch_size", None)}
    path = config.output_dir / "model.pt"
    save_checkpoint(path, checkpoint_dict(model, classes, img_size, model.provenance, extra={"training": settings}))
    print(f"test accuracy {100 * history[-1]['test_accuracy']:.2f}%; model saved to {path}")
    return history


def check_batches(model: Classifier, *loaders) -> int:
    """Refuse, before any training, what would fail late or silently: returns the images' size.

    Both loaders' first batch: square N x 3 x S x S images in [0, 1], the same S, and one-hot labels with a
    column per output of the model (a test folder lacking a class would shift every label after it).
    """
    if not hasattr(model, "provenance"):
        raise UserError("TrainRestNet needs the model from ResNET_Model().model_builder(), which records where "
                        "its weights came from")
    sizes = set()
    for images, labels in (next(iter(loader), (None, None)) for loader in loaders):
        if images is None:
            raise UserError("a loader yields no batches")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise UserError(f"batches must hold N x 3 x S x S images, not {tuple(images.shape)}")
        if images.min() < 0 or images.max() > 1:
            raise UserError("images must be scaled to [0, 1] (the model normalises them itself)")
        if labels.ndim != 2 or labels.shape[1] != model.head.out_features:
            raise UserError(f"labels of shape {tuple(labels.shape)} do not fit a model with "
                            f"{model.head.out_features} outputs: one-hot labels need a column per class, the "
                            f"same classes in both folders, and model_builder(number of classes)")
        sizes.add(images.shape[2])
    if len(sizes) > 1:
        raise UserError(f"training and test images differ in size ({' and '.join(map(str, sorted(sizes)))})")
    return sizes.pop()


def checked_classes(classes: list[str] | None, num_classes: int) -> list[str]:
    """The class names for the checkpoint: those given, else those of the last create_dataset call."""
    classes = classes if classes is not None else CreateDataset.last_classes
    if classes is None or len(classes) != num_classes:
        raise UserError(f"the model has {num_classes} outputs but the class names known are {classes}: pass "
                        f"TrainRestNet(..., classes=[one name per one-hot column])")
    return list(classes)


def train_loader_epoch(model: Classifier, loader, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """One pass over a loader of (images, one-hot labels) batches; returns the mean training loss."""
    model.train()  # Classifier.train keeps a frozen backbone, and all BatchNorm, in eval mode
    loss_sum, count = 0.0, 0
    for images, labels in loader:
        with autocast(device, training=True):
            logits = model(images.to(device, non_blocking=True)).float()
        loss = F.cross_entropy(logits, labels.to(device, non_blocking=True))  # one-hot targets, as the original
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum, count = loss_sum + loss.item() * len(images), count + len(images)
    return loss_sum / count


def loader_logits(model: Classifier, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (eval mode, on CPU) and class indices of every batch of a loader of (images, one-hot labels)."""
    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), autocast(device):
        for images, one_hot_labels in loader:
            logits.append(model(images.to(device, non_blocking=True)).float().cpu())
            labels.append(one_hot_labels.argmax(1))
    return torch.cat(logits), torch.cat(labels)
