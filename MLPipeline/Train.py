"""Training: train(config) is the whole recipe, top to bottom. The settings are TrainConfig (Config.py).

With the backbone frozen (the original recipe) every epoch would give each image the same features, so they
are computed once and the head trains on them: the same batches, Adam and numbers, in a fraction of the time.
Augmentation, unfrozen layers and --no-feature-cache read the images every epoch instead, as the original did.
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
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import MLPipeline.Report as Report
from MLPipeline.Common import autocast, log, pick_device
from MLPipeline.Config import TrainConfig
from MLPipeline.CreateDataset import (CreateDataset, ImageDataset, build_index, check_enough_left, decoded_batch,
                                      image_batches, mark_skipped, unreadable, usable)
from MLPipeline.Distributed import data_parallel, gather, gather_shares, my_share, start_distributed, world
from MLPipeline.FeatureCache import FeatureCache, content_key, fingerprint, load_cache, save_cache
from MLPipeline.OutputFolder import TRAIN_IMAGES, check_write_target, output_lock
from MLPipeline.ResNet_Model import (Classifier, build_model, checkpoint_dict, forward_batches, inference_batch_size,
                                     optimizer_for, prepare_model, save_checkpoint)

SPLITS = ("train", "val", "test")


@dataclass
class TrainingRun:
    """What train() hands back: the trained model, its metrics, and the test images' final logits."""
    model: Classifier
    classes: list[str]
    metrics: dict
    test_paths: list[str]
    test_logits: torch.Tensor


def train(config: TrainConfig) -> TrainingRun:
    """The recipe; its outputs go to config.output_dir, locked for the run (a second run there stops at once)."""
    # The folders it writes, checked before any work: no link, no file of the user's, nothing inside the data.
    check_write_target(config.output_dir, "--output-dir", folder=True, data_dirs=[config.data_dir],
                       writes=TRAIN_IMAGES)
    if config.cache_dir:
        check_write_target(config.cache_dir, "--cache-dir", folder=True, data_dirs=[config.data_dir])
    # torchrun starts this program once per device: each process joins the job here and trains on its share
    # of the images (DDP below averages their gradients); rank 0 alone logs and writes. Alone: rank 0 of 1.
    device = start_distributed(pick_device(config.device))
    rank, world_size = world()
    with output_lock(config.output_dir) if rank == 0 else contextlib.nullcontext():
        started = time.perf_counter()
        # 1. Index: a row per file (path, label, split, why it is skipped), the class being its folder.
        index = build_index(config.data_dir, config.test_size, config.seed, config.val_size, config.dedupe)
        classes = sorted(index.label.unique())
        if config.folds:  # before the features are computed: each class must have an image in every fold
            from MLPipeline.CrossValidation import check_fold_counts
            check_fold_counts(usable(index).label.tolist(), config.folds)
        # 2. The model: an ImageNet backbone, frozen by default, and a new linear head for our classes.
        torch.manual_seed(config.seed)  # the head's initial weights
        model, provenance = build_model(len(classes), config.backbone, config.weights, config.unfreeze)
        model = prepare_model(model, device).eval()  # eval: the frozen backbone's BatchNorm uses its statistics
        # 3. The data, one kind for the whole run: the frozen backbone's features computed once (the head
        #    trains on them), or the images, read again every epoch by the whole network.
        if config.on_features():
            backbone = frozen_backbone(model, config, device, len(usable(index)))
            index, data, cache = read_features(backbone, model, index, classes, provenance, config, device)
            network, loading, shards = model.head, {}, (1, 0)  # every process trains the head on every batch
        else:
            (index, data), cache = read_images(index, classes, config), None
            network, backbone = images_network(model, config, device, len(data["train"]) * config.epochs)
            loading = dict(num_workers=config.workers, collate_fn=decoded_batch, pin_memory=device.type == "cuda")
            shards = (world_size, rank)  # each process its share of every batch
        trained = data_parallel(network, device)  # under torchrun: DDP, gradients averaged at every step
        log.info("data: %s images of %d classes (%s), %d skipped; device %s", " + ".join(f"{len(split)} {name}"
                 for name, split in data.items()), len(classes), ", ".join(classes), (index.skipped != "").sum(), device)
        timings = {"data_s": time.perf_counter() - started}  # decoding, and the features of a frozen backbone
        folds = None
        if config.folds:  # K heads on these features, each scored on the fold it did not train on
            from MLPipeline.CrossValidation import cross_validation
            folds = cross_validation(data, classes, config, device, train_one_epoch)

        # 4. Train: Adam on cross-entropy against one-hot targets, in batches drawn in a seeded order.
        optimizer = optimizer_for(model, config.lr, config.backbone_lr)
        scheduler = CosineAnnealingLR(optimizer, T_max=config.epochs) if config.schedule == "cosine" else None
        weight = None
        if config.class_weights == "balanced":  # every class weighs the same in the loss, however many images
            from MLPipeline.Calibration import balanced_class_weights  # the trust machinery: loaded when asked
            train_labels = usable(index).query("split == 'train'").label.map(classes.index).to_numpy()
            weight = balanced_class_weights(torch.tensor(train_labels), len(classes)).to(device)
        sampler = DistributedSampler(data["train"], *shards, shuffle=True, seed=config.seed)
        train_batches = DataLoader(data["train"], config.batch_size, sampler=sampler, **loading)
        batch_size = config.inference_batch_size or inference_batch_size(device, config.img_size)
        held_out = {name: DataLoader(data[name], batch_size, **loading) for name in ("val", "test") if name in data}
        history, best = [], {"val_loss": math.inf, "epoch": config.epochs}
        for epoch in range(1, config.epochs + 1):
            sampler.set_epoch(epoch)
            network.train()  # Classifier.train keeps a frozen backbone, and all BatchNorm, in eval mode
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": train_one_epoch(trained, train_batches, optimizer, device, weight)}
            if scheduler:
                scheduler.step()
            for name, batches in held_out.items():
                logits, labels = score(network, batches, device)
                row[f"{name}_loss"], row[f"{name}_accuracy"] = Report.loss_and_accuracy(logits, labels)
            if "val" in held_out and row["val_loss"] < best["val_loss"]:  # the test split never chooses
                best = {"val_loss": row["val_loss"], "epoch": epoch,
                        "weights": {key: value.detach().clone() for key, value in model.state_dict().items()}}
            row["elapsed_s"] = round(time.perf_counter() - started - timings["data_s"], 2)  # of training
            history.append(row)
            log.info("epoch %d/%d  train loss %.4f%s  %.1fs", epoch, config.epochs, row["train_loss"], "".join(
                f"  {name} loss {row[f'{name}_loss']:.4f}  {name} accuracy {100 * row[f'{name}_accuracy']:.2f}%"
                for name in held_out), row["elapsed_s"])
        if "val" in held_out:
            model.load_state_dict(best["weights"])
            log.info("kept the weights of epoch %d (lowest validation loss)", best["epoch"])
        timings["train_s"] = time.perf_counter() - started - timings["data_s"]

        # 5. Score the test split; with a validation split, calibrate the probabilities on it.
        test_logits, test_labels = score(network, held_out["test"], device)
        temperature = None  # uncalibrated: probabilities are softmax(logits), T = 1
        if "val" in held_out:  # temperature scaling, on the split that chose the epoch, never on the test split
            from MLPipeline.Calibration import fit_temperature
            temperature = fit_temperature(*score(network, held_out["val"], device))
        timings["total_s"] = time.perf_counter() - started

        # 6. The outputs: metrics, history, split, plots, the feature cache, and model.pt last.
        metrics = Report.training_metrics(
            asdict(config), device, provenance, index, test_labels, test_logits, classes, history=history,
            best_epoch=best["epoch"], test_loss=Report.loss_and_accuracy(test_logits, test_labels)[0],
            timings_s=timings, trained_on="features" if config.on_features() else "images",
            backbone_runtime=getattr(backbone, "name", "pytorch"), temperature=temperature or 1.0,
            calibrated=temperature is not None, cross_validation=folds)
        checkpoint = checkpoint_dict(model, classes, config.img_size, provenance, extra={
            "training": config.recorded(), "temperature": temperature or 1.0, "calibrated": temperature is not None})
        if rank == 0:
            write_outputs(config.output_dir, index, metrics, checkpoint, cache)
        log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * metrics["test_accuracy"],
                 "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
                 provenance["weights_source"], config.output_dir)
        test_paths = usable(index).query("split == 'test'").path.tolist()
        return TrainingRun(model, classes, metrics, test_paths, test_logits)


def train_one_epoch(network, batches, optimizer: torch.optim.Optimizer, device: torch.device,
                    weight: torch.Tensor | None = None) -> float:
    """One pass over (inputs, one-hot targets, ...) batches; returns the mean training loss (every process's).
    weight: each class's weight in the loss (--class-weights), None for all alike."""
    loss_sum, seen = 0.0, 0
    for inputs, targets, *_ in batches:
        with autocast(device, training=True):
            logits = network(inputs.to(device, non_blocking=True)).float()
        loss = F.cross_entropy(logits, targets.to(device, non_blocking=True), weight)  # one-hot, as the original
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + loss.item() * len(inputs), seen + len(inputs)
    totals = gather((loss_sum, seen))
    return sum(total for total, _ in totals) / max(1, sum(count for _, count in totals))


def score(network: nn.Module, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's logits (eval mode, on the CPU) for every batch, and the class indices of their targets."""
    logits, targets, *_ = forward_batches(network.eval(), batches, device, len(batches.dataset), "scoring")
    return logits, targets.argmax(1)


def read_features(backbone, model: Classifier, index: pd.DataFrame, classes: list[str], provenance: dict,
                  config: TrainConfig, device: torch.device) -> tuple[pd.DataFrame, dict, FeatureCache | None]:
    """Every usable file's features: those in the cache read from it, the others computed batch by batch
    (under torchrun each process computes its share). Returns the index with why each unusable file is
    skipped, each split's (features, one-hot targets), and the cache to save with the outputs."""
    rows = usable(index)
    keys = [content_key(path) for path in rows.path]
    cache = load_cache(config.cache_dir or config.output_dir / "cache", fingerprint(
        model, provenance["arch"], config.img_size, config.max_pixels), model.head.in_features)
    todo = [position for position, key in enumerate(keys) if key not in cache.rows]
    log.info("features: %d image(s) from the cache (%s), %d to compute", len(keys) - len(todo), cache.path,
             len(todo))
    batch_size = config.inference_batch_size or inference_batch_size(device, config.img_size)
    mine = [todo[position] for position in my_share(len(todo), batch_size)]  # under torchrun: every N-th batch
    batches = image_batches(rows.path.iloc[mine].tolist(), config.img_size, batch_size, config.workers,
                            max_pixels=config.max_pixels, pin_memory=device.type == "cuda")
    computed, _, done, skipped = forward_batches(backbone, batches, device, len(mine), "features")
    computed, done, skipped = gather_shares(computed, [mine[position] for position in done], skipped)
    index = mark_skipped(index, skipped)
    check_enough_left(usable(index), classes, config.val_size > 0)
    features = torch.empty(len(keys), model.head.in_features)  # a row per file, in the index's order
    found = [position for position, key in enumerate(keys) if key in cache.rows]
    features[found] = cache.features[[cache.rows[keys[position]] for position in found]]
    if done:  # a run that found everything in the cache computed nothing
        features[done] = computed
    if skipped:  # the files that did not decode have no features
        read = ~rows.path.isin(list(skipped)).to_numpy()
        rows, keys, features = rows[read], [key for key, kept in zip(keys, read) if kept], features[read]
    labels = torch.tensor(rows.label.map(classes.index).to_numpy())
    table = TensorDataset(features, F.one_hot(labels, len(classes)).float())
    data = {name: Subset(table, (rows.split == name).to_numpy().nonzero()[0].tolist())
            for name in SPLITS if (rows.split == name).any()}
    updated = FeatureCache(cache.path, cache.fingerprint, {key: row for row, key in enumerate(keys)}, features)
    return index, data, updated if todo else None


def read_images(index: pd.DataFrame, classes: list[str], config: TrainConfig) -> tuple[pd.DataFrame, dict]:
    """Each split's image files as a dataset, decoded anew at every epoch; the files that do not decode are
    found first (decoding only), so that the index names them and each class is known to have images."""
    index = mark_skipped(index, unreadable(usable(index).path.tolist(), config.img_size, config.workers,
                                           config.max_pixels))
    check_enough_left(usable(index), classes, config.val_size > 0)
    rows = usable(index)
    targets = F.one_hot(torch.tensor(rows.label.map(classes.index).to_numpy()), len(classes)).float()
    split_of = rows.split.to_numpy()
    return index, {name: ImageDataset(rows.path[split_of == name].tolist(), config.img_size,
                                      targets[split_of == name], config.max_pixels)
                   for name in SPLITS if name in split_of}


def frozen_backbone(model: Classifier, config: TrainConfig, device: torch.device, images: int):
    """model.features, or (--backbone-runtime auto, onnxruntime) what may run it in ONNX Runtime instead."""
    if config.backbone_runtime == "pytorch":
        return model.features
    from MLPipeline.OnnxBackbone import FrozenBackbone  # ONNX machinery only for the runs that ask for it
    return FrozenBackbone(model, device, config.backbone_runtime, images)


def images_network(model: Classifier, config: TrainConfig, device: torch.device, passes: int):
    """What a batch of images runs through: the augmenter (training mode only), then the model, or a frozen
    backbone that ONNX Runtime may run (--backbone-runtime) and the head. Returns it and that backbone."""
    from MLPipeline.Augment import Augmenter  # machinery that only the runs reading images need
    augment = [Augmenter(config.img_size, config.flips)] if config.augment else []
    if not model.frozen or config.backbone_runtime == "pytorch":
        return nn.Sequential(*augment, model), None
    backbone = frozen_backbone(model, config, device, passes)
    return nn.Sequential(*augment, backbone, model.head), backbone


def write_outputs(output_dir: Path, index: pd.DataFrame, metrics: dict, checkpoint: dict,
                  cache: FeatureCache | None) -> None:
    """split.csv, history.csv, metrics.json, the plots (a plot that fails is a warning), the feature cache when
    it has new features, model.pt last: a run stopped before here leaves the output folder as it was."""
    Report.write_csv(output_dir / "split.csv", index)
    Report.write_csv(output_dir / "history.csv", pd.DataFrame(metrics["history"]))
    Report.write_json(output_dir / "metrics.json", metrics)
    if metrics["cross_validation"]:
        from MLPipeline.CrossValidation import folds_table
        Report.write_csv(output_dir / "folds.csv", folds_table(metrics["cross_validation"]))
    Report.plot_training(metrics, output_dir)
    if cache:
        save_cache(cache)
    save_checkpoint(output_dir / "model.pt", checkpoint)


# --- The original project's entry point (see docs/original-project.md)

def TrainRestNet(model: Classifier, trainloader, testloader, epochs: int = 10, lr: float = 1e-3,
                 classes: list[str] | None = None, output_dir: str | Path = "output",
                 device: str = "auto") -> list[dict]:
    """The original's training call on the recipe's loop: a line per epoch, then output_dir/model.pt. model: from
    ResNET_Model().model_builder(); loaders of (N x 3 x S x S images in [0, 1], N x C one-hot labels); classes:
    the class names (default: those of the create_dataset calls). Returns one row per epoch."""
    from MLPipeline.OriginalScript import check_batches, check_classes  # only the original's script needs them
    config = TrainConfig(output_dir=Path(output_dir), epochs=epochs, lr=lr, device=device)
    img_size = check_batches(model, trainloader, testloader)
    classes = check_classes(CreateDataset.last_classes() if classes is None else classes, model.head.out_features)
    target = pick_device(device)
    model = prepare_model(model, target)
    optimizer = optimizer_for(model, lr)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        row = {"epoch": epoch, "train_loss": train_one_epoch(model, trainloader, optimizer, target)}
        logits, labels = score(model, testloader, target)
        row["test_loss"], row["test_accuracy"] = Report.loss_and_accuracy(logits, labels)
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
