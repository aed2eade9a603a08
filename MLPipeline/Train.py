"""Training, train(): index the folders -> build the model -> the frozen backbone's features, once -> train the
head for the epochs -> score the test split -> write the outputs. The settings are TrainConfig (Config.py).

With the backbone frozen (the original recipe) every epoch would give each image the same features, so they
are computed once and the head trains on them: the same batches, Adam and numbers, in a fraction of the time.
Augmentation, unfrozen layers and --no-feature-cache read the images every epoch, as the original did.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR

import MLPipeline.Report as Report
from MLPipeline.Common import autocast, log, pick_device, progress_reporter
from MLPipeline.CreateDataset import (CreateDataset, Split, build_index, check_enough_left, files_through,
                                      forward_batches, mark_skipped, usable)
from MLPipeline.Config import TrainConfig, recorded_options
from MLPipeline.Distributed import data_parallel, gather, is_main_process, sharded, start_distributed, world
from MLPipeline.FeatureCache import backbone_fingerprint, cached
from MLPipeline.OutputFolder import output_lock
from MLPipeline.ResNet_Model import (Classifier, build_model, check_batches, check_classes, checkpoint_dict,
                                     inference_batch_size, optimizer_for, prepare_model, save_checkpoint)


@dataclass
class TrainingRun:
    """What train() hands back: the trained model, its metrics, and the test images' final logits."""
    model: Classifier
    classes: list[str]
    metrics: dict
    test_paths: list[str]
    test_logits: torch.Tensor


def train(config: TrainConfig) -> TrainingRun:
    """The whole recipe, its outputs written to output_dir, which is locked for the run (a second run stops)."""
    config.check()
    device = start_distributed(pick_device(config.device))  # under torchrun: join the job first
    with output_lock(config.output_dir) if is_main_process() else contextlib.nullcontext():  # rank 0 writes
        return run_training(config, device)


def run_training(config: TrainConfig, device: torch.device) -> TrainingRun:
    started = time.perf_counter()
    index = build_index(config.data_dir, config.test_size, config.seed, config.val_size, config.dedupe)
    classes = sorted(index.label.unique())
    torch.manual_seed(config.seed)  # the head's initial weights
    model, provenance = build_model(len(classes), config.backbone, config.weights, config.unfreeze)
    model = prepare_model(model, device)
    backbone = frozen_backbone(model, config, device, len(usable(index))) if model.frozen else None
    index, splits = read_splits(model, backbone, index, classes, provenance["arch"], config, device)
    timings = {"data_s": time.perf_counter() - started}  # decoding, and the features of a frozen backbone

    folds = cross_validation(splits, index.attrs["presplit"], classes, config, device) if config.folds else None
    history, best_epoch = fit(model, backbone, splits, config, device)
    timings["train_s"] = time.perf_counter() - started - timings["data_s"]
    test_logits, _ = score(model, splits["test"], config, device)
    temperature = calibrated_temperature(model, splits, config, device)
    timings["total_s"] = time.perf_counter() - started

    test_labels = splits["test"].targets.argmax(1)
    metrics = Report.training_metrics(
        asdict(config), device, provenance, index, test_labels, test_logits, classes, history=history,
        best_epoch=best_epoch, test_loss=Report.loss_and_accuracy(test_logits, test_labels)[0], timings_s=timings,
        trained_on="features" if isinstance(splits["train"].inputs, torch.Tensor) else "images",
        backbone_runtime=getattr(backbone, "name", "pytorch"), temperature=temperature, calibrated="val" in splits,
        cross_validation=folds)
    checkpoint = checkpoint_dict(model, classes, config.img_size, provenance, extra={
        "training": recorded_options(config), "temperature": temperature, "calibrated": "val" in splits})
    if is_main_process():
        write_outputs(Path(config.output_dir), index, metrics, checkpoint)
    log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * metrics["test_accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
             provenance["weights_source"], config.output_dir)
    test_paths = usable(index).query("split == 'test'").path.tolist()
    return TrainingRun(model, classes, metrics, test_paths, test_logits)


def frozen_backbone(model: Classifier, config: TrainConfig, device: torch.device, images: int):
    """model.features, or (--backbone-runtime auto, onnxruntime) what may run it in ONNX Runtime instead."""
    if config.backbone_runtime == "pytorch":
        return model.features
    from MLPipeline.OnnxBackbone import FrozenBackbone  # ONNX machinery only for the runs that ask for it
    passes = images * (config.epochs if config.augment or not config.feature_cache else 1)
    return FrozenBackbone(model, device, config.backbone_runtime, passes)


def read_splits(model: Classifier, backbone, index: pd.DataFrame, classes: list[str], arch: str,
                config: TrainConfig, device: torch.device) -> tuple[pd.DataFrame, dict[str, Split]]:
    """Read every usable file once: into the frozen backbone's features (each process its share; files in the
    feature cache not read at all), or just decoded when training reads the images every epoch, so that the
    unreadable ones are known first. Returns the index with why each unusable file is skipped, and the splits."""
    rows, model = usable(index), model.eval()
    on_features = backbone is not None and config.feature_cache
    network = backbone if on_features else (lambda inputs: inputs.new_zeros(len(inputs), 0))  # decode only

    def run_backbone(paths: list[str]) -> tuple[torch.Tensor, list[int], dict[str, str]]:
        return files_through(network, paths, config.img_size, device, inference_batch(config, device),
                             config.workers, config.max_pixels)

    if on_features:
        cache_dir = Path(config.cache_dir or Path(config.output_dir) / "cache")
        run_backbone = cached(run_backbone, cache_dir, backbone_fingerprint(model, arch, config.img_size),
                              model.head.in_features)
    features, positions, skipped = sharded(run_backbone, inference_batch(config, device))(rows.path.tolist())
    index = mark_skipped(index, skipped)
    check_enough_left(usable(index), classes, config.val_size > 0)
    if on_features and is_main_process():
        run_backbone.save()  # only now: a run that stops above leaves the output folder as it was
    read = rows.iloc[positions]
    targets = F.one_hot(torch.tensor(read.label.map(classes.index).to_numpy()), len(classes)).float()
    splits = {}
    for name in ("train", "val", "test"):
        in_split = torch.tensor((read.split == name).to_numpy())
        on_images = not on_features or (name == "train" and config.augment)  # new pixels every epoch
        if in_split.any():
            splits[name] = Split(read.path[in_split.numpy()].tolist() if on_images else features[in_split],
                                 targets[in_split], config.img_size, config.max_pixels)
    log.info("data: %s images of %d classes (%s), %d skipped; device %s",
             " + ".join(f"{len(split.targets)} {name}" for name, split in splits.items()), len(classes),
             ", ".join(classes), (index.skipped != "").sum(), device)
    return index, splits


def batches(split: Split, config: TrainConfig, device: torch.device, epoch: int | None = None):
    """A split's batches for training epoch `epoch` (batch_size of them, in a seeded order), else for scoring."""
    return split.batches(config.batch_size if epoch else inference_batch(config, device), config.workers,
                         config.seed, epoch, world(), device.type == "cuda")


def inference_batch(config: TrainConfig, device: torch.device) -> int:
    return config.inference_batch_size or inference_batch_size(device, config.img_size)


def fit(model: Classifier, backbone, splits: dict[str, Split], config: TrainConfig, device: torch.device,
        ) -> tuple[list[dict], int]:
    """The training loop, a line per epoch with the train loss and each held-out split's loss and accuracy.
    With a validation split the weights of its best epoch are kept (the test split never chooses anything).
    Returns the per-epoch history and the epoch whose weights the model ends with."""
    optimizer = optimizer_for(model, config.lr, config.backbone_lr)
    scheduler = CosineAnnealingLR(optimizer, T_max=config.epochs) if config.schedule == "cosine" else None
    network = training_network(model, backbone, splits["train"], config, device)
    held_out = [name for name in ("val", "test") if name in splits]
    weight = class_weights(splits["train"], config, device)
    history, start, best = [], time.perf_counter(), {"val_loss": math.inf, "epoch": config.epochs}
    for epoch in range(1, config.epochs + 1):
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        model.train()  # Classifier.train keeps a frozen backbone, and all BatchNorm, in eval mode
        row["train_loss"] = train_one_epoch(network, batches(splits["train"], config, device, epoch), optimizer,
                                            device, f"epoch {epoch} training", len(splits["train"].targets), weight)
        if scheduler:
            scheduler.step()
        for name in held_out:
            logits, labels = score(model, splits[name], config, device)
            row[f"{name}_loss"], row[f"{name}_accuracy"] = Report.loss_and_accuracy(logits, labels)
        if "val" in splits and row["val_loss"] < best["val_loss"]:
            best = {"val_loss": row["val_loss"], "epoch": epoch, "weights": {
                key: value.detach().clone() for key, value in model.state_dict().items()}}
        row["elapsed_s"] = round(time.perf_counter() - start, 2)
        history.append(row)
        log.info("epoch %d/%d  train loss %.4f%s  %.1fs", epoch, config.epochs, row["train_loss"],
                 "".join(f"  {name} loss {row[f'{name}_loss']:.4f}  {name} accuracy "
                         f"{100 * row[f'{name}_accuracy']:.2f}%" for name in held_out), row["elapsed_s"])
    if "val" in splits:
        model.load_state_dict(best["weights"])
        log.info("kept the weights of epoch %d (lowest validation loss)", best["epoch"])
    return history, best["epoch"]


def class_weights(train: Split, config: TrainConfig, device: torch.device) -> torch.Tensor | None:
    """--class-weights balanced: n / (classes x n_c), so that every class weighs the same in the loss."""
    if config.class_weights == "none":
        return None
    from MLPipeline.Calibration import balanced_class_weights  # the trust machinery: loaded when asked for
    return balanced_class_weights(train.targets.argmax(1), train.targets.shape[1]).to(device)


def calibrated_temperature(model: Classifier, splits: dict[str, Split], config: TrainConfig, device) -> float:
    """Temperature scaling: the T for which softmax(logits / T) is calibrated on the validation split; else 1."""
    if "val" not in splits:
        return 1.0
    from MLPipeline.Calibration import fit_temperature
    return fit_temperature(*score(model, splits["val"], config, device))


def cross_validation(splits: dict[str, Split], presplit: bool, classes: list[str], config: TrainConfig,
                     device: torch.device) -> dict:
    """--folds K: K heads, each trained by the recipe's own loop on all folds but one, each scoring the fold it
    did not see, on the features computed once (a pre-split folder's test part is left out of the folds)."""
    from MLPipeline.CrossValidation import cross_validate, json_ready, summary_line
    used = [split for name, split in splits.items() if not (presplit and name == "test")]
    features, targets = torch.cat([split.inputs for split in used]), torch.cat([split.targets for split in used])

    def train_head(fold_features: torch.Tensor, labels: torch.Tensor) -> torch.nn.Module:
        torch.manual_seed(config.seed)  # every fold's head starts as the final model's does
        head = torch.nn.Linear(features.shape[1], len(classes)).to(device)
        optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
        fold = Split(fold_features, F.one_hot(labels, len(classes)).float())
        weight = class_weights(fold, config, device)
        for epoch in range(1, config.epochs + 1):
            train_one_epoch(head.train(), batches(fold, config, device, epoch), optimizer, device, weight=weight)
        return head.eval().cpu()
    result = cross_validate(features, targets.argmax(1), classes, config.folds, config.seed, train_head)
    log.info("%s; the final model trains on the training split as without --folds", summary_line(result))
    return json_ready(result)


def training_network(model: Classifier, backbone, train: Split, config: TrainConfig, device: torch.device):
    """What a training batch runs through: on features the head alone; on images the augmentation, if asked
    for, then the frozen backbone and the head, or the whole model (DDP-wrapped under torchrun)."""
    if isinstance(train.inputs, torch.Tensor):
        return model.head
    from MLPipeline.Augment import make_augmenter  # machinery that only the runs reading images need
    trained = data_parallel(model.head if model.frozen else model, device)
    augment = make_augmenter(config.img_size, config.flips) if config.augment else None

    def network(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, training=True):
            images = augment(images) if augment else images
            return (trained(backbone(images)) if model.frozen else trained(images)).float()
    return network


def train_one_epoch(network, batches, optimizer: torch.optim.Optimizer, device: torch.device, label: str = "",
                    total: int = 0, weight: torch.Tensor | None = None) -> float:
    """One pass over (inputs, one-hot targets, ...) batches; returns the mean training loss (every process's).
    weight: each class's weight in the loss (--class-weights), None for all alike."""
    loss_sum, seen, update = 0.0, 0, progress_reporter(label, total)
    for inputs, targets, *_ in batches:
        logits = network(inputs.to(device, non_blocking=True))
        loss = F.cross_entropy(logits, targets.to(device, non_blocking=True), weight)  # one-hot, as the original
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + loss.item() * len(inputs), seen + len(inputs)
        update(seen)
    totals = gather((loss_sum, seen))
    return sum(total for total, _ in totals) / max(1, sum(count for _, count in totals))


def score(model: Classifier, split: Split, config: TrainConfig, device: torch.device,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (eval mode, on the CPU) for every input of a split, and the class indices."""
    network = model.eval().head if isinstance(split.inputs, torch.Tensor) else model
    logits, targets, *_ = forward_batches(network, batches(split, config, device), device, len(split.targets),
                                          "scoring")
    return logits, targets.argmax(1)


def write_outputs(output_dir: Path, index: pd.DataFrame, metrics: dict, checkpoint: dict) -> None:
    """split.csv, history.csv, metrics.json, the two plots (a plot that fails is a warning), model.pt last."""
    Report.write_csv(output_dir / "split.csv", index)
    Report.write_csv(output_dir / "history.csv", pd.DataFrame(metrics["history"]))
    Report.write_json(output_dir / "metrics.json", metrics)
    if metrics["cross_validation"]:
        from MLPipeline.CrossValidation import folds_table
        Report.write_csv(output_dir / "folds.csv", folds_table(metrics["cross_validation"]))
    Report.plot_training(metrics, output_dir)
    save_checkpoint(output_dir / "model.pt", checkpoint)


# --- The original project's entry point (see docs/original-project.md)

def TrainRestNet(model: Classifier, trainloader, testloader, epochs: int = 10, lr: float = 1e-3,
                 classes: list[str] | None = None, output_dir: str | Path = "output",
                 device: str = "auto") -> list[dict]:
    """The original's training call on the recipe's loop: a line per epoch, then output_dir/model.pt. model: from
    ResNET_Model().model_builder(); loaders of (N x 3 x S x S images in [0, 1], N x C one-hot labels); classes:
    the class names (default: those of the last create_dataset call). Returns one row per epoch."""
    config = TrainConfig(output_dir=Path(output_dir), epochs=epochs, lr=lr, device=device)
    config.check()
    img_size = check_batches(model, trainloader, testloader)
    classes = check_classes(classes if classes is not None else CreateDataset.last_classes, model.head.out_features)
    target = pick_device(device)
    model = prepare_model(model, target)
    optimizer = optimizer_for(model, lr)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        row = {"epoch": epoch, "train_loss": train_one_epoch(model, trainloader, optimizer, target)}
        logits, targets, *_ = forward_batches(model.eval(), testloader, target, 0, "scoring")
        row["test_loss"], row["test_accuracy"] = Report.loss_and_accuracy(logits, targets.argmax(1))
        history.append(row)
        # print, as the original did: a bare script sets up no logging, so log.info would show nothing
        print(f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
              f"test accuracy {100 * row['test_accuracy']:.2f}%")
    settings = {"epochs": epochs, "lr": lr, "batch_size": getattr(trainloader, "batch_size", None)}
    path = config.output_dir / "model.pt"
    save_checkpoint(path, checkpoint_dict(model, list(classes), img_size, model.provenance,
                                          extra={"training": settings}))
    print(f"test accuracy {100 * history[-1]['test_accuracy']:.2f}%; model saved to {path}")
    return history
