"""Using a trained model: load it, classify images, score a labelled folder. Nothing here trains."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import MLPipeline.extras.Report as Report
from MLPipeline.extras import Calibration, Familiarity
from MLPipeline.extras.Common import UserError, log, pick_device
from MLPipeline.CreateDataset import image_batches, resize, to_model_input
from MLPipeline.ResNet_Model import Classifier, fast_bf16, forward_batches, inference_batch_size
from MLPipeline.extras.Checkpoint import load_checkpoint
from MLPipeline.extras.Data import load_images, loader, skip_reasons, usable
from MLPipeline.extras.Distributed import is_main_process, sharded, start_distributed
from MLPipeline.extras.Explain import explain_evaluation
from MLPipeline.extras.Export import OnnxModel, load_onnx_model
from MLPipeline.extras.Files import check_data_dir, find_presplit, index_folder, list_images
from MLPipeline.extras.OutputFolder import as_path, check_write_target, output_lock


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
    temperature: float = 1.0  # fitted on a validation split, when training had one: probabilities = softmax(logits / T)
    bf16: bool = False  # the backbone under bfloat16 autocast, as in training (fast_bf16; not when trained in fp32)
    unfamiliar_score: dict | None = None  # fitted in training (Familiarity): flags inputs unlike the training images

    def predictor(self) -> torch.nn.Module:
        """What predict runs: the network, with the backbone's features beside its logits when there is a score."""
        return (Familiarity.WithFeatures(self.network) if self.unfamiliar_score else self.network).eval()

    def outputs(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """The predictor's outputs (on the CPU) of already decoded img_size x img_size uint8 RGB images."""
        batch_size = batch_size or inference_batch_size(self.device, self.img_size)
        inputs = to_model_input(torch.from_numpy(np.ascontiguousarray(images)))
        batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, torch.zeros(len(inputs), 0)),
                                              batch_size)
        return forward_batches(self.predictor(), batches, self.device, self.bf16, "predict")[0]

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Logits (on the CPU) of already decoded img_size x img_size uint8 RGB images."""
        return self.outputs(images, batch_size)[:, :len(self.classes)]


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
    info = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "unfamiliar_score")}
    bf16 = fast_bf16(target) and checkpoint.get("training", {}).get("precision", "auto") == "auto"
    return TrainedModel(network.to(target, memory_format=torch.channels_last).eval(), checkpoint["classes"],
                        checkpoint["img_size"], tuple(checkpoint["mean"]), tuple(checkpoint["std"]), target, info,
                        checkpoint.get("temperature", 1.0), bf16, checkpoint.get("unfamiliar_score"))


def expand_inputs(inputs: list | str | Path) -> list:
    """Folders become the image files under them (recursively); files and arrays pass through. A single path
    (a str or Path, not in a list) is one input: iterating over its characters would read the whole disk."""
    expanded = []
    for item in [inputs] if isinstance(inputs, (str, bytes, os.PathLike)) or not hasattr(inputs, "__iter__") \
            else inputs:
        item = item if isinstance(item, np.ndarray) else as_path(item, "an input")  # never bytes, a tensor, None
        if isinstance(item, Path) and os.path.isdir(item):  # False, not an error, where it cannot be known
            expanded += [str(path) for path in list_images(item)]
        else:
            expanded.append(item)
    return expanded


def file_outputs(model: TrainedModel | OnnxModel, paths: list[str], batch_size: int | None = None,
                 max_pixels: int | None = None, workers: int = 0) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """The model's outputs (logits, and with an unfamiliar-input score the features beside them) of the files that
    decode, their positions in `paths`, and {path: why not} of the others; the files stream through the model
    batch by batch, so a folder of any size keeps memory flat."""
    batches = image_batches(paths, model.img_size, batch_size or inference_batch_size(model.device, model.img_size),
                            workers, load_image=loader(max_pixels), pin_memory=model.device.type == "cuda")
    outputs, _, positions, failed = forward_batches(model.predictor(), batches, model.device, model.bf16, "predict")
    return outputs, positions, failed


def predict(model: TrainedModel | OnnxModel, inputs: list | str | Path, batch_size: int | None = None,
            max_pixels: int | None = None, workers: int = 0, min_confidence: float | None = None,
            review: bool = True) -> pd.DataFrame:
    """Classify image paths, folders or RGB uint8 arrays (a list of them, or one path); one row per image.

    Columns: input, label, confidence, one probability column per class (calibrated by the model's temperature);
    then `decision` (the label, or `review`) and `reason` (unfamiliar, low confidence below min_confidence, or
    both; empty when decided), unless review is False and min_confidence None; with the model's unfamiliar-input
    score, `unfamiliarity` (above 1: unlike the training images of its label) and `closest_class`; and error
    (empty when it worked; otherwise why the input could not be classified, and the other columns are empty).
    review=False: nothing goes to review for being unfamiliar. Files are decoded as in training; arrays are
    resized the same way. Under torchrun each process classifies its share of the files, and every process
    returns the whole table, in order.
    """
    if min_confidence is not None:
        min_confidence = Calibration.check_probability(min_confidence, "min_confidence")
    items = expand_inputs(inputs)
    errors = [""] * len(items)
    files = [position for position, item in enumerate(items) if not isinstance(item, np.ndarray)]
    paths = [str(items[position]) for position in files]
    batch_size = batch_size or inference_batch_size(model.device, model.img_size)
    outputs, positions, failed = sharded(lambda some: file_outputs(model, some, batch_size, max_pixels, workers),
                                         paths, batch_size)
    for position, path in zip(files, paths):
        errors[position] = failed.get(path, "")
    arrays = [position for position, item in enumerate(items) if isinstance(item, np.ndarray)]
    for position in arrays:
        array = items[position]
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
            errors[position] = f"arrays must be H x W x 3 uint8 RGB, not {array.shape} {array.dtype}"
    good_arrays = [position for position in arrays if not errors[position]]
    if good_arrays:
        resized = np.stack([resize(items[position], model.img_size) for position in good_arrays])
        from_arrays = model.outputs(resized, batch_size)
        outputs = torch.cat([outputs, from_arrays]) if positions else from_arrays
    done = [files[position] for position in positions] + good_arrays  # the rows of `outputs`, in order
    probabilities = np.full((len(items), len(model.classes)), np.nan, np.float32)
    if done:
        probabilities[done] = probabilities_of(model, outputs[:, :len(model.classes)])
    results = results_table(items, probabilities, errors, model.classes)
    if review or min_confidence is not None:
        decided = review_table(model, probabilities[done], outputs[:, len(model.classes):] if done else None,
                               min_confidence, review).set_axis(done).reindex(results.index)
        text = decided.select_dtypes(exclude="number").columns
        decided[text] = decided[text].fillna("")  # empty where the input failed, as its label
        results = pd.concat([results.drop(columns="error"), decided, results.error], axis=1)
    return results


def review_table(model: TrainedModel | OnnxModel, probabilities: np.ndarray, features: torch.Tensor | None,
                 min_confidence: float | None, review: bool) -> pd.DataFrame:
    """Familiarity.review_table with the model's score, for predict and evaluate; a model without one (trained
    before it existed, or an .onnx file) gets a note that it cannot flag unfamiliar inputs."""
    score = getattr(model, "unfamiliar_score", None)
    if review and score is None:
        log.warning("note: %s cannot flag inputs unlike its training images (%s); --min-confidence works as before",
                    *(("an .onnx model", "it gives logits only: use model.pt for that") if isinstance(model, OnnxModel)
                      else ("this model.pt", "it was trained before the unfamiliar-input score: train it again")))
    return Familiarity.review_table(score, probabilities, features, model.classes, min_confidence, review)


def probabilities_of(model: TrainedModel | OnnxModel, logits: torch.Tensor) -> np.ndarray:
    """softmax(logits / T): T is 1 for a model trained without a validation split (uncalibrated)."""
    return Calibration.calibrated_probabilities(logits, model.temperature).numpy()


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


# what evaluate draws in its folder
EVALUATION_IMAGES = r"(confusion_matrix|misclassified|calibration|risk_coverage)\.png"
TRAINING_OUTPUTS = r".*\.pt|history\.csv|loss_curve\.png"  # a training run's folder: never evaluate's to overwrite


def evaluate(model: TrainedModel | OnnxModel, data_dir: Path, output_dir: Path, max_pixels: int | None = None,
             max_examples: int = 36, workers: int = 0, explain_count: int = 0,
             min_confidence: float | None = None, review: bool = True) -> dict:
    """Score a labelled folder (one sub-folder per class); write metrics, confusion matrix and misclassified grid.

    Images stream through the model batch by batch; the output folder is locked while it is written. With a
    PyTorch model the grid shows each image's Grad-CAM heatmap, and explained/ holds those images full size
    and the explain_count least confident correct ones. Calibration: the expected calibration error,
    calibration.png and coverage.csv (images kept and their accuracy at each confidence threshold). The review,
    as predict decides it (review, min_confidence): how many images go to review and why, the share decided
    (coverage) and its accuracy, and risk_coverage.png.
    """
    data_dir, output_dir = as_path(data_dir, "data_dir"), as_path(output_dir, "output_dir")
    check_data_dir(data_dir)
    check_write_target(output_dir, "--output-dir", folder=True, data_dirs=[data_dir], writes=EVALUATION_IMAGES,
                       subfolders=["explained"], foreign=TRAINING_OUTPUTS)
    with output_lock(output_dir) if is_main_process() else contextlib.nullcontext():  # before the work
        return scored(model, data_dir, output_dir, max_pixels, max_examples, workers, explain_count, min_confidence,
                      review)


def scored(model: TrainedModel | OnnxModel, data_dir: Path, output_dir: Path, max_pixels: int | None,
           max_examples: int, workers: int, explain_count: int, min_confidence: float | None,
           review: bool) -> dict:
    """evaluate's work, in its locked output folder."""
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
    batch_size = inference_batch_size(model.device, model.img_size)
    outputs, positions, failed = sharded(lambda some: file_outputs(model, some, batch_size, max_pixels, workers),
                                         index.path.tolist(), batch_size)
    skipped.update(failed)
    if not positions:
        raise UserError(f"no readable images in {data_dir}")
    index = index.iloc[positions].reset_index(drop=True)
    probabilities = probabilities_of(model, outputs[:, :len(model.classes)])
    predicted, true_labels = probabilities.argmax(1), index.label.map(model.classes.index).to_numpy()
    report = Report.classification_report(true_labels, predicted, model.classes)
    coverage = Calibration.coverage_table(probabilities, true_labels)
    bins = Calibration.reliability_bins(probabilities, true_labels)
    report.update(temperature=model.temperature, coverage=coverage.to_dict("records"),
                  expected_calibration_error=Calibration.expected_calibration_error(probabilities, true_labels))
    report.update(unknown_classes=unknown, skipped=skipped, images=len(index), model_info={
        key: model.info[key] for key in ("arch", "weights_source", "pretrained", "created_utc")})
    predictions = index.assign(predicted=[model.classes[i] for i in predicted], confidence=probabilities.max(1))
    correct, decided, familiar = predicted == true_labels, None, None
    if review or min_confidence is not None:  # as predict decides
        predictions = predictions.join(review_table(model, probabilities, outputs[:, len(model.classes):],
                                                    min_confidence, review))
        decided = (predictions.decision != Calibration.REVIEW).to_numpy()
        familiar = ~predictions.reason.str.contains(Familiarity.UNFAMILIAR).to_numpy()
        report["review"] = Familiarity.review_report(predictions.reason, correct, min_confidence,
                                                     review and getattr(model, "unfamiliar_score", None) is not None)
    if is_main_process():
        wrong = predictions.path[predictions.label != predictions.predicted].tolist()[:max_examples]
        misclassified = explain_evaluation(model, predictions, load_images(wrong, model.img_size)[0],
                                           Path(output_dir), explain_count)
        Report.write_evaluation(Path(output_dir), report, predictions, misclassified)
        Report.write_csv(Path(output_dir) / "coverage.csv", coverage)
        Report.draw(Calibration.plot_reliability, bins, report["expected_calibration_error"],
                    Path(output_dir) / "calibration.png",
                    f"{Report.backbone_title(model.info)}, temperature {model.temperature:.3g}")
        Report.draw(Calibration.plot_risk_coverage, probabilities.max(1), correct, familiar, decided,
                    Path(output_dir) / "risk_coverage.png", Report.backbone_title(model.info))
    return report
