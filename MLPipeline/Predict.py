"""Using a trained model: load it, classify images, score a labelled folder. Nothing here trains."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from MLPipeline import Report
from MLPipeline.Common import UserError, check_output_dir, log, pick_device
from MLPipeline.CreateDataset import (check_data_dir, find_presplit, index_folder, list_images, load_images,
                                      mark_skipped, resize, skip_reasons, usable)
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


def predict(model: TrainedModel, inputs: list, batch_size: int = 64, max_pixels: int | None = None) -> pd.DataFrame:
    """Classify image paths, folders or RGB uint8 arrays; one row per image.

    Columns: input, label, confidence, one probability column per class, and error (empty when it worked;
    otherwise why the input could not be classified, and the other columns are empty).
    Files are decoded by load_images, exactly as in training; images over max_pixels are refused.
    """
    items = expand_inputs(inputs)
    decoded, skipped = load_images([str(item) for item in items if not isinstance(item, np.ndarray)],
                                   model.img_size, max_pixels)
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


def evaluate(model: TrainedModel, data_dir: Path, output_dir: Path, max_pixels: int | None = None) -> dict:
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
    images, skipped = load_images(usable(index).path.tolist(), model.img_size, max_pixels)
    index = mark_skipped(index, skipped)
    skipped = skip_reasons(index)  # files that are not images too
    index = usable(index).reset_index(drop=True)
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
