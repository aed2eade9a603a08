"""Loading a checkpoint (the recipe's model.pt) for prediction, every field checked before it is used.

The file is a plain dict (ResNet_Model.checkpoint_dict); it is loaded with weights_only=True after its zip
archive is checked (Common.safe_torch_load), and refused with one clear message when it is not ours,
damaged or edited.
"""
from __future__ import annotations

import math
from pathlib import Path

from torch import nn
import torch

from MLPipeline.ResNet_Model import CHECKPOINT_FORMAT, Classifier, remove_classifier
from MLPipeline.extras.Common import UserError, first_line, safe_torch_load
from MLPipeline.extras.Familiarity import check_score
from MLPipeline.extras.Weights import create_backbone

TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures fit_temperature gives: beyond, the logits are degenerate

# The keys every checkpoint has besides its weights (the recipe's checkpoint_dict writes them).
REQUIRED = ("classes", "arch", "img_size", "mean", "std", "head", "weights_source", "pretrained", "created_utc",
            "torch_version", "format")


def check_model_file(path: Path, how_to_make_one: str) -> None:
    """A model file must be a file that exists; the message says how to get one."""
    if path.is_dir():
        raise UserError(f"model file {path} is a folder; pass the file itself")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: {how_to_make_one}")


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    """Rebuild the trained model from a checkpoint file; returns (model in eval mode on CPU, checkpoint). Its
    unfamiliar-input score, when it has one, is checked too (Familiarity.check_score)."""
    path = Path(path)
    check_model_file(path, "train one first with `python engine.py`")
    checkpoint = safe_torch_load(path, "model file")
    missing = [key for key in ("state_dict", *REQUIRED) if key not in checkpoint]
    if checkpoint.get("format") != CHECKPOINT_FORMAT or missing:
        raise UserError(f"{path} is not a model file of this project (missing: {', '.join(missing) or 'format'})")
    if not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"{path} is damaged: its weights are not of the expected kind")
    check_model_info(checkpoint, path)
    if not all(torch.isfinite(tensor).all() for tensor in checkpoint["state_dict"].values()
               if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
        raise UserError(f"{path} is damaged: its weights hold NaN or infinite values (a run that diverged?)")
    try:
        backbone = create_backbone(checkpoint["arch"])
        model = Classifier(backbone, nn.Linear(remove_classifier(backbone), len(checkpoint["classes"])),
                           checkpoint["mean"], checkpoint["std"])
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} does not match its declared architecture {checkpoint['arch']} with "
                        f"{len(checkpoint['classes'])} classes: {first_line(error)}") from None
    check_score(checkpoint.get("unfamiliar_score"), len(checkpoint["classes"]), model.head.in_features, path)
    return model.eval(), checkpoint


def check_model_info(info: dict, source) -> dict:
    """What prediction relies on, checked: a non-empty list of distinct class names, a whole img_size in range,
    3 finite means and positive stds, a temperature in the range fit_temperature gives (1 when absent: an older
    checkpoint).
    UserError naming `source` (a checkpoint or an exported file) otherwise. Returns info."""
    classes, size, temperature = info.get("classes"), info.get("img_size"), info.get("temperature", 1.0)
    problems = []
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)
            and len(set(classes)) == len(classes)):
        problems.append("classes")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        problems.append("img_size")
    if not all(is_number_list(info.get(key), 3) for key in ("mean", "std")) or min(info["std"]) <= 0:
        problems.append("mean and std")
    if not is_number_list([temperature], 1) or not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:
        problems.append("temperature")
    if problems:
        raise UserError(f"{source} is damaged or edited: its {', '.join(problems)} cannot be used "
                        f"(classes {str(classes)[:80]}, img_size {size!r}, temperature {temperature!r})")
    return info


def is_number_list(values, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))
