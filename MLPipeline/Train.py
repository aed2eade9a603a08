"""Training loop, evaluation and prediction, with the frozen-feature cache.

With the backbone frozen (the original recipe), every epoch would push every image through the same
ResNet50 and get the same features. So by default the features are computed once, in large inference
batches, and the head trains on them for all epochs: same batches of 8, same Adam, same numbers, a
fraction of the time. `cache_features=False` runs the original's full forward pass every batch instead.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from MLPipeline import Report
from MLPipeline.CreateDataset import (UserError, build_index, check_data_dir,
                                      find_presplit, index_folder, list_images, load_images, make_augmenter,
                                      one_hot, resize, stratified_split, to_model_input)
from MLPipeline.ResNet_Model import (BACKBONES, UNFREEZE_CHOICES, Classifier, build_model, checkpoint_dict,
                                     load_checkpoint, save_checkpoint)

log = logging.getLogger("MLPipeline")

PROGRESS_SECONDS = 10.0  # how often long loops print a progress line
MIN_IMG_SIZE = 32  # the ResNet/VGG stems downsample 32x; smaller inputs vanish
MAX_IMG_SIZE = 1024  # beyond this a run would only exhaust memory
# The settings that shaped the weights, recorded in the checkpoint.
TRAINING_SETTINGS = ("epochs", "batch_size", "lr", "seed", "schedule", "augment", "flips", "unfreeze", "val_size")


@dataclass
class TrainConfig:
    """A training run's settings; the defaults are the original project's recipe."""
    data_dir: Path = Path("Data")
    output_dir: Path = Path("output")
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    img_size: int = 200
    test_size: float = 0.2
    seed: int = 42
    weights: str = "auto"
    device: str = "auto"
    arch: str = "resnet50"
    cache_features: bool = True  # compute a frozen backbone's features once (same results, much faster)
    inference_batch_size: int = 64
    # The original's "further improvements", all off by default:
    schedule: str = "none"  # 'cosine' anneals the learning rate to 0 over the epochs
    augment: bool = False
    flips: bool = False  # with augment: mirror images too (mirrored text never occurs in real photos)
    unfreeze: str = "none"  # 'last' stage of the backbone or 'all' of it, trained at backbone_lr
    backbone_lr: float | None = None  # default lr / 10
    val_size: float = 0.0  # > 0: carve a validation split from train and keep the best epoch's weights

    def check(self) -> None:
        """Raise UserError for settings out of range, before any work is done."""
        problems = [
            (self.epochs < 1, f"--epochs must be at least 1, not {self.epochs}"),
            (self.batch_size < 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (not self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (self.backbone_lr is not None and not self.backbone_lr > 0,
             f"--backbone-lr must be positive, not {self.backbone_lr}"),
            (not 0 < self.test_size < 1, f"--test-size must be between 0 and 1, not {self.test_size}"),
            (not 0 <= self.val_size < 1, f"--val-size must be 0 (off) or between 0 and 1, not {self.val_size}"),
            (not MIN_IMG_SIZE <= self.img_size <= MAX_IMG_SIZE,
             f"--img-size must be between {MIN_IMG_SIZE} (the backbone's minimum) and {MAX_IMG_SIZE}, "
             f"not {self.img_size}"),
            (self.seed < 0, f"--seed must be 0 or more, not {self.seed}"),
            (self.inference_batch_size < 1, "inference_batch_size must be at least 1"),
            (self.arch not in BACKBONES, f"unknown backbone '{self.arch}': choose from {', '.join(BACKBONES)}"),
            (self.unfreeze not in UNFREEZE_CHOICES, f"--unfreeze must be one of {', '.join(UNFREEZE_CHOICES)}"),
            (self.schedule not in ("none", "cosine"), f"--schedule must be none or cosine, not {self.schedule}"),
        ]
        for failed, message in problems:
            if failed:
                raise UserError(message)
        pick_device(self.device)
        check_output_dir(self.output_dir)


def check_output_dir(output_dir: Path) -> None:
    """An output folder may not exist yet, but must not be a file: checked before any work is done."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"output folder {output_dir} is a file; choose a folder with --output-dir")


def pick_device(name: str) -> torch.device:
    """'auto' = the GPU when there is one; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def progress_reporter(label: str, total: int) -> Callable[[int], None]:
    """A callback that logs 'label: done/total' at most every PROGRESS_SECONDS."""
    start = last = time.perf_counter()

    def update(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and done < total:
            log.info("  %s: %d/%d (%.1f images/s)", label, done, total, done / (now - start))
            last = now
    return update


def autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where the GPU has it, else fp16); a no-op on the CPU."""
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype, enabled=on_cuda)


def forward_in_batches(network: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, device: torch.device,
                       batch_size: int, label: str = "forward") -> torch.Tensor:
    """Run uint8 N x H x W x 3 images through `network` (a model in eval mode, or its `features`); float32
    outputs on the device.

    On CUDA: pinned memory, non-blocking copies, channels_last and mixed precision.
    Returns an inference tensor: `.clone()` it before using it to train.
    """
    on_cuda = device.type == "cuda"
    source = torch.from_numpy(images)
    if on_cuda:
        source = source.pin_memory()
    outputs, update = [], progress_reporter(label, len(images))
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(images), batch_size):
            batch = to_model_input(source[start:start + batch_size].to(device, non_blocking=True))
            if on_cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            outputs.append(network(batch).float())
            update(start + batch_size)
    return torch.cat(outputs)


def prepare_model(model: Classifier, device: torch.device) -> Classifier:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


@dataclass
class Split:
    """One split's decoded images (N x S x S x 3 uint8, in memory for the run) and class indices."""
    images: np.ndarray
    labels: torch.Tensor


def load_dataset(config: TrainConfig, device: torch.device) -> tuple[pd.DataFrame, list[str], dict[str, Split]]:
    """Index the data folder, split it, decode every image once; returns (index, classes, splits).

    The index keeps every file with its split and, for files that could not be used, the reason.
    """
    index = build_index(config.data_dir, config.test_size, config.seed)
    if config.val_size:
        index = stratified_split(index, config.val_size, config.seed, to_split="val")
    classes = sorted(index.label.unique())
    images, skipped = load_images(index.path.tolist(), config.img_size)
    index["skipped"] = index.path.map(skipped)
    used = index[index.skipped.isna()]
    check_enough_left(used, classes, config.val_size > 0)
    split_of = used.split.to_numpy()
    labels = torch.tensor(used.label.map(classes.index).to_numpy(), device=device)
    splits = {name: Split(images[split_of == name], labels[torch.from_numpy(split_of == name).to(device)])
              for name in ("train", "val", "test") if (split_of == name).any()}
    log.info("data: %s images of %d classes (%s), %d skipped; device %s",
             " + ".join(f"{len(split.labels)} {name}" for name, split in splits.items()), len(classes),
             ", ".join(classes), len(skipped), device)
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


def uses_feature_cache(config: TrainConfig, model: Classifier) -> bool:
    return config.cache_features and model.frozen and not config.augment


def logit_functions(model: Classifier, splits: dict[str, Split], config: TrainConfig, device: torch.device):
    """(train_logits(batch indices), split_logits(split name)) for fit().

    With the feature cache, both read the head's input from features computed once here; otherwise the
    full network runs on every batch (with augmentation, if asked for).
    """
    if uses_feature_cache(config, model):
        model.eval()
        features = {name: forward_in_batches(model.features, split.images, device, config.inference_batch_size,
                                             label=f"features ({name})").clone()  # a normal tensor, to train on
                    for name, split in splits.items()}

        def train_logits(batch: torch.Tensor) -> torch.Tensor:
            return model.head(features["train"][batch.to(device)])

        def split_logits(name: str) -> torch.Tensor:
            with torch.no_grad():
                return model.head(features[name])
        return train_logits, split_logits

    augment = make_augmenter(config.img_size, config.flips) if config.augment else None
    train_images = torch.from_numpy(splits["train"].images)

    def train_logits(batch: torch.Tensor) -> torch.Tensor:
        batch_images = augment(train_images[batch]) if augment else train_images[batch]
        inputs = to_model_input(batch_images.to(device, non_blocking=True))
        with autocast(device):
            return model(inputs).float()

    def split_logits(name: str) -> torch.Tensor:  # batches of the training size, as the original evaluated
        model.eval()
        return forward_in_batches(model, splits[name].images, device, config.batch_size, label=name).clone()
    return train_logits, split_logits


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy against one-hot targets, and the fraction of correct argmax predictions."""
    loss = F.cross_entropy(logits, one_hot(labels, logits.shape[1])).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def fit(model: Classifier, train_logits: Callable[[torch.Tensor], torch.Tensor],
        split_logits: Callable[[str], torch.Tensor], splits: dict[str, Split], config: TrainConfig,
        ) -> tuple[list[dict], int]:
    """The training loop: Adam, cross-entropy on one-hot targets, shuffled batches, one line per epoch.

    With a validation split, the weights of the epoch with the lowest validation loss are restored at the
    end; the test split is reported every epoch but never used to choose anything.
    Returns the per-epoch history and the epoch whose weights the model ends with.
    """
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": model.head.parameters(), "lr": config.lr},
                                  {"params": backbone_parameters, "lr": config.backbone_lr or config.lr / 10}])
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.schedule == "cosine" else None)
    shuffle = torch.Generator().manual_seed(config.seed)
    train_labels, num_classes = splits["train"].labels, model.head.out_features
    history, start = [], time.perf_counter()
    best_loss, best_epoch, best_weights = float("inf"), config.epochs, None
    for epoch in range(1, config.epochs + 1):
        model.train()
        order, loss_sum = torch.randperm(len(train_labels), generator=shuffle), 0.0
        update = progress_reporter(f"epoch {epoch} training", len(order))
        for first in range(0, len(order), config.batch_size):
            batch = order[first:first + config.batch_size]
            loss = F.cross_entropy(train_logits(batch), one_hot(train_labels[batch], num_classes))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            update(first + len(batch))
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / len(order)}
        if scheduler:
            scheduler.step()
        line = f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.4f}"
        for name in ("val", "test") if "val" in splits else ("test",):
            row[f"{name}_loss"], row[f"{name}_accuracy"] = loss_and_accuracy(split_logits(name), splits[name].labels)
            line += f"  {name} loss {row[f'{name}_loss']:.4f}  {name} accuracy {100 * row[f'{name}_accuracy']:.2f}%"
        if "val" in splits and row["val_loss"] < best_loss:
            best_loss, best_epoch = row["val_loss"], epoch
            best_weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
        row["elapsed_s"] = round(time.perf_counter() - start, 2)
        history.append(row)
        log.info("%s  %.1fs", line, row["elapsed_s"])
    if best_weights is not None:
        model.load_state_dict(best_weights)
        log.info("kept the weights of epoch %d (lowest validation loss)", best_epoch)
    return history, best_epoch


@dataclass
class TrainingRun:
    """What train() hands back: the trained model, its metrics, and the test images' final logits."""
    model: Classifier
    classes: list[str]
    metrics: dict
    test_paths: list[str]
    test_logits: torch.Tensor


def train(config: TrainConfig) -> TrainingRun:
    """The whole pipeline: index, decode, build, train, evaluate, then write every output to output_dir."""
    config.check()
    device = pick_device(config.device)
    started = time.perf_counter()
    index, classes, splits = load_dataset(config, device)
    timings = {"decode_s": time.perf_counter() - started}

    torch.manual_seed(config.seed)  # the head's initial weights
    model, provenance = build_model(len(classes), config.arch, config.weights, config.unfreeze)
    model = prepare_model(model, device)
    phase = time.perf_counter()
    train_logits, split_logits = logit_functions(model, splits, config, device)
    if uses_feature_cache(config, model):
        timings["features_s"] = time.perf_counter() - phase

    phase = time.perf_counter()
    history, best_epoch = fit(model, train_logits, split_logits, splits, config)
    timings["train_s"] = time.perf_counter() - phase
    test_logits = split_logits("test").cpu()
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
    training_settings = {key: settings[key] for key in TRAINING_SETTINGS}
    checkpoint = checkpoint_dict(model, classes, config.img_size, provenance,
                                 extra={"training": training_settings})
    write_training_outputs(Path(config.output_dir), index, metrics, checkpoint)
    log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * report["accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
             provenance["weights_source"],
             config.output_dir)
    test_paths = index.path[(index.split == "test") & index.skipped.isna()].tolist()
    return TrainingRun(model, classes, metrics, test_paths, test_logits)


def dataset_summary(index: pd.DataFrame) -> dict:
    """Images used per class and split, and the files skipped with their reasons."""
    used, skipped = index[index.skipped.isna()], index[index.skipped.notna()]
    return {"classes": sorted(index.label.unique()),
            "counts": {label: rows.split.value_counts().sort_index().to_dict()
                       for label, rows in used.groupby("label")},
            "skipped_count": len(skipped), "skipped": dict(zip(skipped.path, skipped.skipped))}


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


@dataclass
class TrainedModel:
    """A checkpoint loaded for prediction: the network and how its inputs must be prepared."""
    network: Classifier
    classes: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    info: dict  # the checkpoint's fields other than the weights


def load_model(path: str | Path = "output/model.pt", device: str = "auto") -> TrainedModel:
    """Load a trained checkpoint once, ready for predict(); refuses files that are not ours."""
    network, checkpoint = load_checkpoint(Path(path))
    target = pick_device(device)
    info = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    return TrainedModel(prepare_model(network, target), checkpoint["classes"], checkpoint["img_size"],
                        tuple(checkpoint["mean"]), tuple(checkpoint["std"]), target, info)


def expand_inputs(inputs: list) -> list:
    """Folders become the image files under them (recursively); files and arrays pass through."""
    expanded = []
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            expanded += [str(path) for path in list_images(Path(item))]
        else:
            expanded.append(item)
    return expanded


def predict_logits(model: TrainedModel, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Logits (on CPU) of already decoded img_size x img_size uint8 RGB images."""
    return forward_in_batches(model.network, images, model.device, batch_size, label="predict").cpu()


def predict(model: TrainedModel, inputs: list, batch_size: int = 64) -> pd.DataFrame:
    """Classify image paths, folders or RGB uint8 arrays; one row per image.

    Columns: input, label, confidence, one probability column per class, and error (empty when it worked;
    otherwise why the input could not be classified, and the other columns are empty).
    Files are decoded by load_images, exactly as in training.
    """
    items = expand_inputs(inputs)
    decoded, skipped = load_images([str(item) for item in items if not isinstance(item, np.ndarray)],
                                   model.img_size)
    next_decoded = iter(decoded)
    rows, images = [], []
    for position, item in enumerate(items):
        if not isinstance(item, np.ndarray):
            error = skipped.get(str(item), "")
            image = None if error else next(next_decoded)
        elif item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            error, image = f"arrays must be H x W x 3 uint8 RGB, not {item.shape} {item.dtype}", None
        else:
            error, image = "", resize(item, model.img_size)
        rows.append({"input": f"array[{position}]" if isinstance(item, np.ndarray) else str(item), "error": error})
        if image is not None:
            images.append(image)
    results = pd.DataFrame(rows, columns=["input", "error"])
    ok = results.error == ""
    if images:
        probabilities = predict_logits(model, np.stack(images), batch_size).softmax(1).numpy()
        results.loc[ok, "label"] = [model.classes[i] for i in probabilities.argmax(1)]
        results.loc[ok, "confidence"] = probabilities.max(1)
        for column, name in enumerate(model.classes):
            results.loc[ok, f"p_{name}"] = probabilities[:, column]
    columns = ["input", "label", "confidence", *[f"p_{name}" for name in model.classes], "error"]
    return results.reindex(columns=columns)


def evaluate(model: TrainedModel, data_dir: Path, output_dir: Path) -> dict:
    """Score a labelled folder (one sub-folder per class); write metrics, confusion matrix and misclassified grid."""
    check_data_dir(data_dir)
    check_output_dir(output_dir)
    presplit = find_presplit(Path(data_dir))  # a pre-split folder is scored on its test part
    index = index_folder(presplit[1] if presplit else Path(data_dir))
    if index.empty:
        raise UserError(f"no images found in class sub-folders of {data_dir}")
    unknown = sorted(set(index.label) - set(model.classes))
    if unknown:
        log.warning("warning: the model does not know class(es) %s (it knows %s); their %d image(s) are left out",
                    ", ".join(unknown), ", ".join(model.classes), index.label.isin(unknown).sum())
        index = index[~index.label.isin(unknown)].reset_index(drop=True)
        if index.empty:
            raise UserError(f"none of the classes in {data_dir} is one the model knows ({', '.join(model.classes)})")
    images, skipped = load_images(index.path.tolist(), model.img_size)
    index = index[~index.path.isin(skipped)].reset_index(drop=True)
    if index.empty:
        raise UserError(f"no readable images in {data_dir}")
    true_labels = index.label.map(model.classes.index).to_numpy()
    probabilities = predict_logits(model, images).softmax(1).numpy()
    predicted = probabilities.argmax(1)
    report = Report.classification_report(true_labels, predicted, model.classes)
    report.update(unknown_classes=unknown, skipped=skipped, images=len(index), model_info={
        key: model.info[key] for key in ("arch", "weights_source", "pretrained", "created_utc")})
    Report.write_evaluation(Path(output_dir), report, index.assign(predicted=[model.classes[i] for i in predicted],
                                                                    confidence=probabilities.max(1)), images)
    return report
