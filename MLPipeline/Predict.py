"""Using a trained model: load it, classify images, score a labelled folder. Nothing here trains."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from MLPipeline import Report
from MLPipeline.Common import (UserError, check_output_dir, gather, is_main_process, log, pick_device,
                               progress_reporter, shard, start_distributed)
from MLPipeline.CreateDataset import (check_data_dir, find_presplit, index_folder, list_images, resize, skip_reasons,
                                      stream_images, usable)
from MLPipeline.Export import OnnxModel, load_onnx_model
from MLPipeline.ResNet_Model import Classifier, forward_in_batches, load_checkpoint, prepare_model


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

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Logits (on CPU) of already decoded img_size x img_size uint8 RGB images."""
        return forward_in_batches(self.network, images, self.device, batch_size, label="predict").cpu()


def load_model(path: str | Path = "output/model.pt", device: str = "auto") -> TrainedModel | OnnxModel:
    """Load a trained checkpoint, or an .onnx file exported from one, once, ready for predict() and evaluate().

    Refuses files that are not ours.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return load_onnx_model(path, device)
    if path.suffix.lower() == ".pt2":
        raise UserError(f"{path} is a torch.export program: load it with torch.export.load; predict and evaluate "
                        f"take model.pt or an exported .onnx file")
    network, checkpoint = load_checkpoint(path)
    target = start_distributed(pick_device(device))
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


def predict(model: TrainedModel | OnnxModel, inputs: list, batch_size: int | None = None,
            max_pixels: int | None = None) -> pd.DataFrame:
    """Classify image paths, folders or RGB uint8 arrays; one row per image.

    Columns: input, label, confidence, one probability column per class, and error (empty when it worked;
    otherwise why the input could not be classified, and the other columns are empty).
    Files are decoded as in training, chunk by chunk (images over max_pixels are refused): a folder of any size
    keeps memory flat. Under torchrun
    each process classifies its shard of the inputs, and every process returns the whole table, in order.
    """
    items = expand_inputs(inputs)
    mine = shard(items)
    probabilities = np.full((len(items), len(model.classes)), np.nan, np.float32)
    errors = [""] * len(items)
    shard_results = classify(model, [items[i] for i in mine], batch_size, max_pixels)
    for positions, shard_probabilities, shard_errors in gather((mine, *shard_results)):
        probabilities[positions] = shard_probabilities
        for position, error in zip(positions, shard_errors):
            errors[position] = error
    return results_table(items, probabilities, errors, model.classes)


def classify(model: TrainedModel | OnnxModel, items: list, batch_size: int | None = None,
             max_pixels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(class probabilities, NaN where it failed; the error of each item, "" where it worked) of files and arrays."""
    probabilities = np.full((len(items), len(model.classes)), np.nan, np.float32)
    errors = [""] * len(items)
    arrays = [position for position, item in enumerate(items) if isinstance(item, np.ndarray)]
    for position in arrays:
        if items[position].ndim != 3 or items[position].shape[2] != 3 or items[position].dtype != np.uint8:
            errors[position] = f"arrays must be H x W x 3 uint8 RGB, not {items[position].shape} {items[position].dtype}"
    good_arrays = [position for position in arrays if not errors[position]]
    if good_arrays:
        resized = np.stack([resize(items[position], model.img_size) for position in good_arrays])
        probabilities[good_arrays] = model.logits(resized, batch_size).softmax(1).numpy()
    files = [position for position in range(len(items)) if position not in set(arrays)]
    paths = [str(items[position]) for position in files]
    skipped, done, update = {}, 0, progress_reporter("predict", len(files))
    for chunk in stream_images(paths, model.img_size, max_pixels=max_pixels):
        if chunk.positions:
            logits = model.logits(chunk.images, batch_size)
            probabilities[[files[p] for p in chunk.positions]] = logits.softmax(1).numpy()
        skipped.update(chunk.skipped)
        done += len(chunk.positions) + len(chunk.skipped)
        update(done)
    for position, path in zip(files, paths):
        errors[position] = skipped.get(path, "") if np.isnan(probabilities[position, 0]) else ""
    return probabilities, errors


def results_table(items: list, probabilities: np.ndarray, errors: list[str], classes: list[str]) -> pd.DataFrame:
    """predict()'s rows: input, label, confidence, p_<class>..., error; empty where the input failed."""
    ok = np.array([not error for error in errors], dtype=bool)
    results = pd.DataFrame({"input": [f"array[{position}]" if isinstance(item, np.ndarray) else str(item)
                                      for position, item in enumerate(items)]})
    results["label"] = pd.Series([classes[i] for i in probabilities[ok].argmax(1)], index=results.index[ok],
                                 dtype=object)
    results["confidence"] = pd.Series(probabilities[ok].max(1) if ok.any() else [], index=results.index[ok],
                                      dtype=float)
    for column, name in enumerate(classes):
        results[f"p_{name}"] = pd.Series(probabilities[ok, column], index=results.index[ok], dtype=float)
    results["error"] = errors
    return results


def evaluate(model: TrainedModel | OnnxModel, data_dir: Path, output_dir: Path, max_pixels: int | None = None,
             max_examples: int = 36) -> dict:
    """Score a labelled folder (one sub-folder per class); write metrics, confusion matrix and misclassified grid.

    Images stream through the model chunk by chunk; only the first `max_examples` misclassified ones are kept.
    """
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
    skipped = skip_reasons(index)  # files that are not images: named when the folder was read
    index = usable(index).reset_index(drop=True)
    true_labels = index.label.map(model.classes.index).to_numpy()
    probabilities = np.full((len(index), len(model.classes)), np.nan, np.float32)
    examples = {}
    for shard_probabilities, shard_skipped, shard_examples in gather(
            score_shard(model, index.path.tolist(), true_labels, max_examples, max_pixels)):
        probabilities[list(shard_probabilities)] = list(shard_probabilities.values())
        skipped.update(shard_skipped)
        examples.update(shard_examples)
    scored = ~np.isnan(probabilities[:, 0])
    if not scored.any():
        raise UserError(f"no readable images in {data_dir}")
    index, probabilities, true_labels = index[scored].reset_index(drop=True), probabilities[scored], true_labels[scored]
    predicted = probabilities.argmax(1)
    report = Report.classification_report(true_labels, predicted, model.classes)
    report.update(unknown_classes=unknown, skipped=skipped, images=len(index), model_info={
        key: model.info[key] for key in ("arch", "weights_source", "pretrained", "created_utc")})
    predictions = index.assign(predicted=[model.classes[i] for i in predicted], confidence=probabilities.max(1))
    if is_main_process():
        first_wrong = sorted(examples)[:max_examples]  # the order of the rows of `predictions`
        Report.write_evaluation(Path(output_dir), report, predictions, np.array([examples[p] for p in first_wrong]))
    return report


def score_shard(model: TrainedModel | OnnxModel, paths: list[str], true_labels: np.ndarray, max_examples: int,
                max_pixels: int | None = None) -> tuple[dict[int, np.ndarray], dict[str, str], dict[int, np.ndarray]]:
    """This process's share of evaluate(): ({position: probabilities}, {bad path: reason}, and the images of
    its first `max_examples` misclassified files by position). Images stream through chunk by chunk."""
    mine = shard(paths)
    probabilities, skipped, examples, done = {}, {}, {}, 0
    update = progress_reporter("evaluate", len(mine))
    for chunk in stream_images([paths[i] for i in mine], model.img_size, max_pixels=max_pixels):
        chunk_probabilities = model.logits(chunk.images).softmax(1).numpy() if chunk.positions else []
        for position, row, image in zip(chunk.positions, chunk_probabilities, chunk.images):
            probabilities[mine[position]] = row
            if row.argmax() != true_labels[mine[position]] and len(examples) < max_examples:
                examples[mine[position]] = image
        skipped.update(chunk.skipped)
        done += len(chunk.positions) + len(chunk.skipped)
        update(done)
    return probabilities, skipped, examples
