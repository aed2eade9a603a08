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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from MLPipeline import Report
from MLPipeline.CreateDataset import (IMAGENET_MEAN, IMAGENET_STD, BadImageError, UserError, build_index,
                                      check_data_dir, index_folder, list_images, load_image, load_images,
                                      make_augmenter, one_hot, resize, stratified_split, to_model_input)
from MLPipeline.ResNet_Model import (BACKBONES, UNFREEZE_CHOICES, Classifier, build_model, checkpoint_dict,
                                     load_checkpoint, save_checkpoint)

log = logging.getLogger("MLPipeline")

PROGRESS_SECONDS = 10.0  # how often long loops print a progress line
MIN_IMG_SIZE = 32  # the ResNet/VGG stems downsample 32x; smaller inputs vanish
MAX_IMG_SIZE = 1024  # beyond this a run would only exhaust memory


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


def forward_in_batches(network: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, label: str = "forward") -> torch.Tensor:
    """Run uint8 N x H x W x 3 images through `network` in eval mode; float32 outputs on the device.

    On CUDA: pinned memory, non-blocking copies, channels_last and bf16 autocast.
    Returns an inference tensor: `.clone()` it before using it to train.
    """
    on_cuda = device.type == "cuda"
    source = torch.from_numpy(images)
    if on_cuda:
        source = source.pin_memory()
    outputs, update = [], progress_reporter(label, len(images))
    network.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        for start in range(0, len(images), batch_size):
            batch = to_model_input(source[start:start + batch_size].to(device, non_blocking=True), mean, std)
            if on_cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            outputs.append(network(batch).float())
            update(start + batch_size)
    return torch.cat(outputs) if outputs else torch.zeros(0, device=device)


def prepare_model(model: Classifier, device: torch.device) -> Classifier:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


Logits = Callable[[], torch.Tensor]


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(cross-entropy loss on one-hot targets, accuracy)."""
    loss = F.cross_entropy(logits, one_hot(labels, num_classes)).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def fit(model: Classifier, train_logits: Callable[[torch.Tensor], torch.Tensor], train_labels: torch.Tensor,
        test_logits: Logits, test_labels: torch.Tensor, config: TrainConfig, num_classes: int,
        val_logits: Logits | None = None, val_labels: torch.Tensor | None = None) -> tuple[list[dict], int]:
    """The training loop: Adam, cross-entropy on one-hot targets, shuffled batches, one line per epoch.

    train_logits(batch_indices) gives the logits of those training images; test_logits() and val_logits()
    those of the whole test and validation sets. With a validation set, the weights of the epoch with the
    lowest validation loss are restored at the end; the test set is reported, never used to choose.
    Returns the per-epoch history and the epoch whose weights the model ends with.
    """
    head_parameters = list(model.head.parameters())
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": head_parameters, "lr": config.lr},
                                  {"params": backbone_parameters, "lr": config.backbone_lr or config.lr / 10}])
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.schedule == "cosine" else None)
    shuffle = torch.Generator().manual_seed(config.seed)
    history, best, start = [], None, time.perf_counter()
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
        row["test_loss"], row["test_accuracy"] = evaluate_logits(test_logits(), test_labels, num_classes)
        line = f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.4f}"
        if val_logits:
            row["val_loss"], row["val_accuracy"] = evaluate_logits(val_logits(), val_labels, num_classes)
            line += f"  val loss {row['val_loss']:.4f}  val accuracy {100 * row['val_accuracy']:.2f}%"
            if best is None or row["val_loss"] < best[0]:
                best = row["val_loss"], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()}
        row["elapsed_s"] = round(time.perf_counter() - start, 2)
        history.append(row)
        log.info("%s  test loss %.4f  test accuracy %.2f%%  %.1fs", line, row["test_loss"],
                 100 * row["test_accuracy"], row["elapsed_s"])
    if not best:
        return history, config.epochs
    model.load_state_dict(best[2])
    log.info("kept the weights of epoch %d (lowest validation loss)", best[1])
    return history, best[1]


@dataclass
class TrainingRun:
    """What train() hands back: the trained model and everything it reported."""
    model: Classifier
    classes: list[str]
    metrics: dict
    test_paths: list[str] = field(default_factory=list)
    test_logits: torch.Tensor | None = None


def train(config: TrainConfig) -> TrainingRun:
    """The whole pipeline: index, decode, build, train, evaluate, then write every output to output_dir."""
    config.check()
    device = pick_device(config.device)
    timings, started = {}, time.perf_counter()
    index = build_index(config.data_dir, config.test_size, config.seed)
    if config.val_size:
        index = stratified_split(index, config.val_size, config.seed, to_split="val")
    classes = sorted(index.label.unique())

    images, skipped = load_images(index.path.tolist(), config.img_size)
    index["skipped"] = index.path.map(skipped)
    used = index[index.skipped.isna()].reset_index(drop=True)
    check_enough_left(used, classes)
    labels = torch.tensor(used.label.map(classes.index).to_numpy())
    split_of = used.split.to_numpy()
    splits = {name: (images[split_of == name], labels[torch.from_numpy(split_of == name)].to(device))
              for name in ("train", "val", "test")}
    timings["decode_s"] = time.perf_counter() - started
    log.info("data: %s images of %d classes (%s), %d skipped; device %s",
             " + ".join(f"{len(splits[name][1])} {name}" for name in splits if len(splits[name][1])),
             len(classes), ", ".join(classes), len(skipped), device)

    torch.manual_seed(config.seed)
    model, provenance = build_model(len(classes), config.arch, config.weights, config.unfreeze)
    model = prepare_model(model, device)
    phase = time.perf_counter()
    if config.cache_features and model.frozen and not config.augment:
        features = {name: forward_in_batches(model.backbone, split_images, device, config.inference_batch_size,
                                             label=f"features ({name})").clone()  # a normal tensor, to train on
                    for name, (split_images, _) in splits.items()}
        timings["features_s"] = time.perf_counter() - phase
        train_logits = lambda batch: model.head(features["train"][batch.to(device)])  # noqa: E731
        logits_of = lambda name: lambda: model.head(features[name]).detach()  # noqa: E731
    else:
        augment = make_augmenter(config.img_size, config.flips) if config.augment else None
        train_source = torch.from_numpy(splits["train"][0])

        def train_logits(batch: torch.Tensor) -> torch.Tensor:
            batch_images = augment(train_source[batch]) if augment else train_source[batch]
            return model(to_model_input(batch_images.to(device), IMAGENET_MEAN, IMAGENET_STD))
        logits_of = lambda name: lambda: forward_in_batches(  # noqa: E731
            model, splits[name][0], device, config.batch_size, label=name).clone()
    phase = time.perf_counter()
    history, best_epoch = fit(model, train_logits, splits["train"][1], logits_of("test"), splits["test"][1], config,
                  len(classes), logits_of("val") if config.val_size else None, splits["val"][1])
    timings["train_s"] = time.perf_counter() - phase
    final_logits = logits_of("test")().cpu()
    timings["total_s"] = time.perf_counter() - started

    report = Report.classification_report(splits["test"][1].cpu().numpy(), final_logits.argmax(1).numpy(), classes)
    test_loss, _ = evaluate_logits(final_logits, splits["test"][1].cpu(), len(classes))
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    metrics = {
        "config": settings, "device": str(device), "torch_version": str(torch.__version__), **provenance,
        "dataset": {"classes": classes,
                    "counts": used.groupby(["label", "split"]).size().unstack(fill_value=0).T.to_dict(),
                    "skipped_count": len(skipped), "skipped": skipped},
        "history": history, "best_epoch": best_epoch, "test_accuracy": report["accuracy"], "test_loss": test_loss,
        **{key: value for key, value in report.items() if key != "accuracy"},
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
    }
    checkpoint = checkpoint_dict(model, classes, config.arch, config.img_size, provenance,
                                 extra={"training": {key: settings[key] for key in (
                                     "epochs", "batch_size", "lr", "seed", "schedule", "augment", "flips",
                                     "unfreeze", "val_size")}})
    write_training_outputs(Path(config.output_dir), index, metrics, checkpoint)
    log.info("test accuracy %.2f%% (%s backbone: %s); outputs in %s", 100 * report["accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["weights_source"],
             config.output_dir)
    test_paths = used.path[(used.split == "test").to_numpy()].tolist()
    return TrainingRun(model, classes, metrics, test_paths, final_logits)


def check_enough_left(used: pd.DataFrame, classes: list[str]) -> None:
    """After skipping bad files, every class still needs a training image and the test split an image."""
    for label in classes:
        if not ((used.label == label) & (used.split == "train")).any():
            raise UserError(f"class '{label}' has no usable training images left after skipping bad files")
    if not (used.split == "test").any():
        raise UserError("no usable test images left after skipping bad files")


def write_training_outputs(output_dir: Path, index: pd.DataFrame, metrics: dict, checkpoint: dict) -> None:
    """split.csv, history.csv, metrics.json, the two plots, and model.pt last; each written atomically."""
    Report.write_csv(output_dir / "split.csv", index)
    history = pd.DataFrame(metrics["history"])
    Report.write_csv(output_dir / "history.csv", history)
    Report.write_json(output_dir / "metrics.json", metrics)
    Report.plot_loss_curve(history, output_dir / "loss_curve.png", pretrained=metrics["pretrained"])
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
    return forward_in_batches(model.network, images, model.device, batch_size, model.mean, model.std,
                              label="predict").cpu()


def predict(model: TrainedModel, inputs: list, batch_size: int = 64) -> pd.DataFrame:
    """Classify image paths, folders or RGB uint8 arrays; one row per image.

    Columns: input, label, confidence, one probability column per class, and error (empty when it worked;
    otherwise why the input could not be classified, and the other columns are empty).
    """
    rows, images = [], []
    for position, item in enumerate(expand_inputs(inputs)):
        name = str(item) if isinstance(item, (str, Path)) else f"array[{position}]"
        try:
            if isinstance(item, np.ndarray):
                if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                    raise BadImageError(f"arrays must be H x W x 3 uint8 RGB, not {item.shape} {item.dtype}")
                image = resize(item, model.img_size)
            elif not Path(item).is_file():
                raise BadImageError("no such file")
            else:
                image = load_image(item, model.img_size)
            images.append(image)
            rows.append({"input": name, "error": ""})
        except (BadImageError, OSError) as error:
            rows.append({"input": name, "error": str(error)})
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
    index = index_folder(Path(data_dir))
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
