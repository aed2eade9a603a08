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
                                      one_hot, resize, to_model_input)
from MLPipeline.ResNet_Model import Classifier, build_model, checkpoint_dict, load_checkpoint, save_checkpoint

log = logging.getLogger("MLPipeline")

PROGRESS_SECONDS = 10.0  # how often long loops print a progress line
MIN_IMG_SIZE = 32  # the ResNet/VGG stems downsample 32x; smaller inputs vanish


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
    cache_features: bool = True
    inference_batch_size: int = 64

    def check(self) -> None:
        """Raise UserError for settings out of range, before any work is done."""
        problems = [
            (self.epochs < 1, f"--epochs must be at least 1, not {self.epochs}"),
            (self.batch_size < 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (not self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (not 0 < self.test_size < 1, f"--test-size must be between 0 and 1, not {self.test_size}"),
            (self.img_size < MIN_IMG_SIZE, f"--img-size must be at least {MIN_IMG_SIZE} for the backbone, "
                                           f"not {self.img_size}"),
            (self.inference_batch_size < 1, "inference_batch_size must be at least 1"),
        ]
        for failed, message in problems:
            if failed:
                raise UserError(message)
        pick_device(self.device)


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


def fit(model: Classifier, train_inputs: Callable[[torch.Tensor], torch.Tensor], train_labels: torch.Tensor,
        test_logits: Callable[[], torch.Tensor], test_labels: torch.Tensor, config: TrainConfig,
        num_classes: int) -> list[dict]:
    """The training loop: Adam, cross-entropy on one-hot targets, shuffled batches, one line per epoch.

    train_inputs(batch_indices) gives the logits of those training images; test_logits() those of the test set.
    """
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    shuffle = torch.Generator().manual_seed(config.seed)
    history, start = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order, loss_sum = torch.randperm(len(train_labels), generator=shuffle), 0.0
        update = progress_reporter(f"epoch {epoch} training", len(order))
        for first in range(0, len(order), config.batch_size):
            batch = order[first:first + config.batch_size]
            loss = F.cross_entropy(train_inputs(batch), one_hot(train_labels[batch], num_classes))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            update(first + len(batch))
        logits = test_logits()
        test_loss = F.cross_entropy(logits, one_hot(test_labels, num_classes)).item()
        accuracy = (logits.argmax(1) == test_labels).float().mean().item()
        history.append({"epoch": epoch, "train_loss": loss_sum / len(order), "test_loss": test_loss,
                        "test_accuracy": accuracy, "elapsed_s": round(time.perf_counter() - start, 2)})
        log.info("epoch %d/%d  train loss %.4f  test loss %.4f  test accuracy %.2f%%  %.1fs", epoch,
                 config.epochs, history[-1]["train_loss"], test_loss, 100 * accuracy, history[-1]["elapsed_s"])
    return history


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
    classes = sorted(index.label.unique())

    images, skipped = load_images(index.path.tolist(), config.img_size)
    index["skipped"] = index.path.map(skipped)
    used = index[index.skipped.isna()].reset_index(drop=True)
    check_enough_left(used, classes)
    labels = torch.tensor(used.label.map(classes.index).to_numpy())
    is_train = torch.tensor((used.split == "train").to_numpy())
    train_images, test_images = images[is_train.numpy()], images[~is_train.numpy()]
    train_labels, test_labels = labels[is_train], labels[~is_train]
    timings["decode_s"] = time.perf_counter() - started
    log.info("data: %d train and %d test images of %d classes (%s), %d skipped; device %s",
             len(train_labels), len(test_labels), len(classes), ", ".join(classes), len(skipped), device)

    torch.manual_seed(config.seed)
    model, provenance = build_model(len(classes), config.arch, config.weights, frozen=True)
    model = prepare_model(model, device)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)

    phase = time.perf_counter()
    if config.cache_features:
        def features_of(batch_images: np.ndarray, label: str) -> torch.Tensor:
            return forward_in_batches(model.backbone, batch_images, device, config.inference_batch_size,
                                      label=label).clone()  # a normal tensor, usable to train
        train_features = features_of(train_images, "features (train)")
        test_features = features_of(test_images, "features (test)")
        timings["features_s"] = time.perf_counter() - phase
        train_inputs = lambda batch: model.head(train_features[batch.to(device)])  # noqa: E731
        test_logits = lambda: model.head(test_features).detach()  # noqa: E731
    else:
        train_source = torch.from_numpy(train_images)
        train_inputs = lambda batch: model(to_model_input(train_source[batch].to(device), IMAGENET_MEAN,  # noqa: E731
                                                          IMAGENET_STD))
        test_logits = lambda: forward_in_batches(model, test_images, device, config.batch_size,  # noqa: E731
                                                 label="test").clone()
    phase = time.perf_counter()
    history = fit(model, train_inputs, train_labels, test_logits, test_labels, config, len(classes))
    timings["train_s"] = time.perf_counter() - phase
    final_logits = test_logits().cpu()
    timings["total_s"] = time.perf_counter() - started

    test_paths = used.path[~is_train.numpy()].tolist()
    report = Report.classification_report(test_labels.cpu().numpy(), final_logits.argmax(1).numpy(), classes)
    metrics = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
        "device": str(device), "torch_version": str(torch.__version__), **provenance,
        "dataset": {"classes": classes,
                    "counts": used.groupby(["split", "label"]).size().unstack(fill_value=0).to_dict(),
                    "skipped_count": len(skipped), "skipped": skipped},
        "history": history, "test_accuracy": report["accuracy"], "test_loss": history[-1]["test_loss"],
        **{key: value for key, value in report.items() if key != "accuracy"},
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
    }
    checkpoint = checkpoint_dict(model, classes, config.arch, config.img_size, provenance)
    write_training_outputs(Path(config.output_dir), index, metrics, checkpoint)
    log.info("test accuracy %.2f%% (%s backbone: %s); outputs in %s", 100 * report["accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["weights_source"],
             config.output_dir)
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
