"""A training run with the tool's options: the recipe's pieces composed with the machinery they call for.

Run.train (and engine.py) come here for any option off its default, or under torchrun; the epochs call the
recipe's own train_one_epoch: one loop in the project.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import MLPipeline.extras.Report as Report
from MLPipeline import Train
from MLPipeline.CreateDataset import ImageDataset, decoded_batch, image_batches
from MLPipeline.ResNet_Model import (Classifier, build_model, checkpoint_dict, fast_bf16, forward_batches,
                                     inference_batch_size)
from MLPipeline.Train import TrainingRun, check_enough_left, run_metrics, save_outputs, score
from MLPipeline.extras.Common import log, pick_device
from MLPipeline.extras.Run import RunConfig
from MLPipeline.extras.Data import build_index, mark_skipped, unreadable, usable
from MLPipeline.extras.Distributed import data_parallel, gather, gather_shares, my_share, start_distributed, world
from MLPipeline.extras import Familiarity
from MLPipeline.extras.FeatureCache import FeatureCache, content_key, fingerprint, load_cache, save_cache
from MLPipeline.extras.Files import loader
from MLPipeline.extras.Unfreeze import optimizer_for, unfreeze
from MLPipeline.extras.Weights import load_backbone

SPLITS = ("train", "val", "test")


def train_with_options(config: RunConfig) -> TrainingRun:
    """The recipe's steps with the options asked for: a validation split, cross-validation, class weights,
    a cosine schedule, augmentation or unfrozen layers (the network then reads images every epoch), the
    disk cache of features, ONNX Runtime, calibration; under torchrun each process trains on its share."""
    # torchrun starts this program once per device: each process joins the job here and trains on its share
    # of the images (DDP averages their gradients); rank 0 alone logs and writes. Alone: rank 0 of 1.
    device = start_distributed(pick_device(config.device))
    rank, world_count = world()
    started = time.perf_counter()
    index = build_index(config.data_dir, config.test_size, config.seed, config.val_size, config.dedupe)
    classes = sorted(usable(index).label.unique())
    if config.folds:  # before the features are computed: each class must have an image in every fold
        from MLPipeline.extras.CrossValidation import check_fold_counts
        check_fold_counts(usable(index).label.tolist(), config.folds)
    torch.manual_seed(config.seed)  # the head's initial weights
    model, provenance = build_model(len(classes), config.backbone, config.weights, load_backbone)
    model = unfreeze(model, config.unfreeze).to(device, memory_format=torch.channels_last).eval()
    if config.on_features():  # every process trains the head on every batch, in the recipe's order
        backbone = frozen_backbone(model, config, device, len(usable(index)))
        index, data, cache = read_features(backbone, model, index, classes, provenance, config, device)
        network, loading, sampler = model.head, {}, None
        order = dict(shuffle=True, generator=torch.Generator().manual_seed(config.seed))  # the recipe's order
    else:  # each process its share of every batch
        (index, data), cache = read_images(index, classes, config), None
        network, backbone = images_network(model, config, device, len(data["train"]) * config.epochs)
        loading = dict(num_workers=config.workers, collate_fn=decoded_batch, pin_memory=device.type == "cuda")
        sampler = DistributedSampler(data["train"], world_count, rank, shuffle=True, seed=config.seed)
        order = dict(sampler=sampler)
    trained = data_parallel(network, device)  # under torchrun: DDP, gradients averaged at every step
    log.info("data: %s images of %d classes (%s), %d skipped; device %s", " + ".join(
        f"{len(split)} {name}" for name, split in data.items()), len(classes), ", ".join(classes),
             (index.skipped != "").sum(), device)
    timings = {"data_s": time.perf_counter() - started}
    folds = None
    if config.folds:  # K heads on these features, each scored on the fold it did not train on
        from MLPipeline.extras.CrossValidation import cross_validation
        folds = cross_validation(data, classes, config, device, Train.train_one_epoch)

    optimizer = optimizer_for(model, config.lr, config.backbone_lr)
    scheduler = CosineAnnealingLR(optimizer, T_max=config.epochs) if config.schedule == "cosine" else None
    weight = None
    if config.class_weights == "balanced":  # every class weighs the same in the loss, however many images
        from MLPipeline.extras.Calibration import balanced_class_weights
        train_labels = usable(index).query("split == 'train'").label.map(classes.index).to_numpy()
        weight = balanced_class_weights(torch.tensor(train_labels), len(classes)).to(device)
    train_batches = DataLoader(data["train"], config.batch_size, **order, **loading)
    batch_size = config.inference_batch_size or inference_batch_size(device, config.img_size)
    held_out = {name: DataLoader(data[name], batch_size, **loading) for name in ("val", "test") if name in data}
    history, best = [], {"val_loss": math.inf, "epoch": config.epochs}
    for epoch in range(1, config.epochs + 1):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        network.train()  # Classifier.train keeps a frozen backbone, and all BatchNorm, in eval mode
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": mean_over_processes(Train.train_one_epoch(trained, train_batches, optimizer, device,
                                                                       weight), len(sampler or data["train"]))}
        if scheduler:
            scheduler.step()
        for name, batches in held_out.items():
            row[f"{name}_loss"], row[f"{name}_accuracy"] = Train.loss_and_accuracy(*score(network, batches, device))
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

    test_logits, test_labels = score(network, held_out["test"], device)
    temperature = None  # uncalibrated: probabilities are softmax(logits), T = 1
    if "val" in held_out:  # temperature scaling, on the split that chose the epoch, never on the test split
        from MLPipeline.extras.Calibration import fit_temperature
        temperature = fit_temperature(*score(network, held_out["val"], device))
    unfamiliar_score = familiarity_score(model, data, len(classes), config, device) if rank == 0 else None
    timings["total_s"] = time.perf_counter() - started

    timings = {name: round(seconds, 2) for name, seconds in timings.items()}
    metrics = run_metrics(config, device, provenance, index, history, test_logits, test_labels, classes, timings)
    metrics["dataset"]["duplicates"] = dict(zip(*index.query("duplicate_of != ''")[["path", "duplicate_of"]].T.values))
    metrics.update(best_epoch=best["epoch"], trained_on="features" if config.on_features() else "images",
                   backbone_runtime=getattr(backbone, "name", "pytorch"), temperature=temperature or 1.0,
                   calibrated=temperature is not None, cross_validation=folds,
                   unfamiliar_score=Familiarity.summary(unfamiliar_score))
    checkpoint = checkpoint_dict(model, classes, config.img_size, provenance, training=config.recorded(),
                                 temperature=temperature or 1.0, calibrated=temperature is not None,
                                 unfamiliar_score=unfamiliar_score)
    if rank == 0:
        write_outputs(config.output_dir, index, metrics, checkpoint, cache)
    log.info("test accuracy %.2f%% (%s %s backbone: %s); outputs in %s", 100 * metrics["test_accuracy"],
             "pretrained" if provenance["pretrained"] else "NOT pretrained", provenance["arch"],
             provenance["weights_source"], config.output_dir)
    test_paths = usable(index).query("split == 'test'").path.tolist()
    return TrainingRun(model, classes, metrics, index, test_paths, test_logits)


def familiarity_score(model: Classifier, data: dict, num_classes: int, config: RunConfig,
                      device: torch.device) -> dict | None:
    """The unfamiliar-input score fitted on the training features, its threshold set on the validation split's
    when there is one (else out of --folds folds). A run on images computes them first, with the trained model."""
    share, folds = config.unfamiliar_share, config.folds or Familiarity.FOLDS
    if config.on_features():
        return Familiarity.fit_on_splits(data, num_classes, share, folds)
    # a run on images: one more pass over the training (and validation) images, without augmentation
    bf16 = config.precision == "auto" and fast_bf16(device)
    batch_size = config.inference_batch_size or inference_batch_size(device, config.img_size)
    features = {name: forward_batches(model.eval().features, DataLoader(
        data[name], batch_size, num_workers=config.workers, collate_fn=decoded_batch), device, bf16, "features")[:2]
        for name in ("train", "val") if name in data}
    features = {name: (values, targets.argmax(1)) for name, (values, targets) in features.items()}
    return Familiarity.fit(*features["train"], num_classes, features.get("val"), share, folds)


def mean_over_processes(loss: float, count: int) -> float:
    """The mean of every process's mean training loss, weighted by how many images each saw."""
    totals = gather((loss * count, count))
    return sum(total for total, _ in totals) / max(1, sum(seen for _, seen in totals))


def read_features(backbone, model: Classifier, index: pd.DataFrame, classes: list[str], provenance: dict,
                  config: RunConfig, device: torch.device) -> tuple[pd.DataFrame, dict, FeatureCache | None]:
    """Every usable file's features: with --cache-dir, those in the cache read from it; the others computed
    batch by batch (under torchrun each process computes its share). Returns the index with why each
    unusable file is skipped, each split's (features, one-hot targets), and the cache to save, if any."""
    rows = usable(index)
    keys = [content_key(path) for path in rows.path] if config.cache_dir else [""] * len(rows)
    bf16 = config.precision == "auto" and fast_bf16(device)
    cache = load_cache(config.cache_dir, fingerprint(model, provenance["arch"], config.img_size, config.max_pixels,
                                                     bf16), model.head.in_features) if config.cache_dir else None
    todo = [position for position, key in enumerate(keys) if not cache or key not in cache.rows]
    if cache:
        log.info("features: %d image(s) from the cache (%s), %d to compute", len(keys) - len(todo), cache.path,
                 len(todo))
    batch_size = config.inference_batch_size or inference_batch_size(device, config.img_size)
    mine = [todo[position] for position in my_share(len(todo), batch_size)]  # under torchrun: every N-th batch
    batches = image_batches(rows.path.iloc[mine].tolist(), config.img_size, batch_size, config.workers,
                            load_image=loader(config.max_pixels), pin_memory=device.type == "cuda")
    computed, _, done, skipped = forward_batches(backbone, batches, device, bf16, "features")
    computed, done, skipped = gather_shares(computed, [mine[position] for position in done], skipped)
    index = mark_skipped(index, skipped)
    check_enough_left(usable(index), classes, config.held_out())
    features = torch.empty(len(keys), model.head.in_features)  # a row per file, in the index's order
    found = [position for position, key in enumerate(keys) if cache and key in cache.rows]
    if found:
        features[found] = cache.features[[cache.rows[keys[position]] for position in found]]
    if done:  # a run that found everything in the cache computed nothing
        features[done] = computed
    if skipped:  # the files that did not decode have no features
        read = ~rows.path.isin(list(skipped)).to_numpy()
        rows, keys, features = rows[read], [key for key, kept in zip(keys, read) if kept], features[read]
    labels = torch.tensor(rows.label.map(classes.index).to_numpy())
    table = TensorDataset(features, F.one_hot(labels, len(classes)).float())  # Subsets of it: no copies
    data = {name: Subset(table, (rows.split == name).to_numpy().nonzero()[0].tolist())
            for name in SPLITS if (rows.split == name).any()}
    if not cache or not todo:  # without --cache-dir, or nothing new to keep
        return index, data, None
    return index, data, FeatureCache(cache.path, cache.fingerprint, {key: row for row, key in enumerate(keys)},
                                     features)


def read_images(index: pd.DataFrame, classes: list[str], config: RunConfig) -> tuple[pd.DataFrame, dict]:
    """Each split's images, decoded every epoch (augmentation, unfrozen layers, --no-feature-cache); the files
    that do not decode are found and named first, so that every epoch has the same batches."""
    index = mark_skipped(index, unreadable(usable(index).path.tolist(), config.img_size, config.workers,
                                           config.max_pixels))
    check_enough_left(usable(index), classes, config.held_out())
    rows = usable(index)
    targets = F.one_hot(torch.tensor(rows.label.map(classes.index).to_numpy()), len(classes)).float()
    split_of = rows.split.to_numpy()
    return index, {name: ImageDataset(rows.path[split_of == name].tolist(), config.img_size,
                                      targets[split_of == name], loader(config.max_pixels))
                   for name in SPLITS if name in split_of}


def frozen_backbone(model: Classifier, config: RunConfig, device: torch.device, images: int):
    """model.features, or (--backbone-runtime auto, onnxruntime) what may run it in ONNX Runtime instead."""
    if config.backbone_runtime == "pytorch":
        return model.features
    from MLPipeline.extras.OnnxBackbone import FrozenBackbone  # ONNX machinery only for the runs that ask for it
    return FrozenBackbone(model, device, config.backbone_runtime, images)


def images_network(model: Classifier, config: RunConfig, device: torch.device, passes: int):
    """What a batch of images runs through: the augmenter (training mode only), then the model, or a frozen
    backbone that ONNX Runtime may run (--backbone-runtime) and the head. Returns it and that backbone."""
    from MLPipeline.extras.Augment import Augmenter  # machinery that only the runs reading images need
    augment = [Augmenter(config.img_size, config.flips)] if config.augment else []
    if not model.frozen or config.backbone_runtime == "pytorch":
        return nn.Sequential(*augment, model), None
    backbone = frozen_backbone(model, config, device, passes)
    return nn.Sequential(*augment, backbone, model.head), backbone


def write_outputs(output_dir: Path, index: pd.DataFrame, metrics: dict, checkpoint: dict,
                  cache: FeatureCache | None) -> None:
    """split.csv, history.csv, the plots, folds.csv, the feature cache when it has new features, then the
    recipe's metrics.json and model.pt last: a run stopped before here leaves the output folder as it was."""
    Report.write_csv(output_dir / "split.csv", index)
    Report.write_csv(output_dir / "history.csv", pd.DataFrame(metrics["history"]))
    if metrics["cross_validation"]:
        from MLPipeline.extras.CrossValidation import folds_table
        Report.write_csv(output_dir / "folds.csv", folds_table(metrics["cross_validation"]))
    Report.plot_training(metrics, output_dir)
    if cache:
        save_cache(cache)
    save_outputs(output_dir, Report.strict_json(metrics), checkpoint)
