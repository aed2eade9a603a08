"""What the original project's entry points check before they run (see docs/original-project.md): the
loaders and class names its unchanged script hands to TrainRestNet, refused early with one clear message.
"""
from __future__ import annotations

from MLPipeline.Common import UserError


def check_batches(model, *loaders) -> int:
    """Refuse, before any training, what would fail late or silently: returns the images' size.

    Both loaders' first batch: square N x 3 x S x S images in [0, 1], the same S, and one-hot labels with a
    column per output of the model (a test folder lacking a class would shift every label after it).
    """
    if not hasattr(model, "provenance"):
        raise UserError("TrainRestNet needs the model from ResNET_Model().model_builder(), which records where "
                        "its weights came from")
    sizes = set()
    for images, labels in (next(iter(loader), (None, None)) for loader in loaders):
        if images is None:
            raise UserError("a loader yields no batches")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise UserError(f"batches must hold N x 3 x S x S images, not {tuple(images.shape)}")
        if images.min() < 0 or images.max() > 1:
            raise UserError("images must be scaled to [0, 1] (the model normalises them itself)")
        if labels.ndim != 2 or labels.shape[1] != model.head.out_features:
            raise UserError(f"labels of shape {tuple(labels.shape)} do not fit a model with "
                            f"{model.head.out_features} outputs: one-hot labels need a column per class, the "
                            f"same classes in both folders, and model_builder(number of classes)")
        sizes.add(images.shape[2])
    if len(sizes) > 1:
        raise UserError(f"training and test images differ in size ({' and '.join(map(str, sorted(sizes)))})")
    return sizes.pop()


def check_classes(classes: list[str] | None, num_classes: int) -> list[str]:
    """The class names for TrainRestNet's checkpoint: one per output of the model."""
    if classes is None or len(classes) != num_classes:
        raise UserError(f"the model has {num_classes} outputs but the class names known are {classes}: pass "
                        f"TrainRestNet(..., classes=[one name per one-hot column])")
    return list(classes)
