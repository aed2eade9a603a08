"""See why: Grad-CAM heatmaps (Selvaraju et al., 2017) on the backbone's last convolutional stage.

The class score's gradient with respect to that stage's activations, averaged over space, weighs its channels;
the ReLU of the weighted sum is where the evidence for the class lies. Only gradients with respect to the
activations are taken (torch.autograd.grad), so the model's weights, .grad fields, BatchNorm statistics and
mode are left as they were found.
The map is as coarse as that stage: img_size / 32 cells a side on ResNets (7 x 7 at 200 px, 1 x 1 at 32 px).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure  # a bare Figure needs no GUI backend and no global pyplot state
from torch import nn

from MLPipeline.extras.Common import UserError, atomic_write, log
from MLPipeline.CreateDataset import resize
from MLPipeline.extras.Files import BadImageError, read_image
from MLPipeline.extras.OutputFolder import own_folder, remove_own

BATCH_SIZE = 16  # images per Grad-CAM pass: the backward pass keeps the activations of the whole stage
DISPLAY_SIDE = 768  # big JPEGs are decoded reduced to about this side for the pictures: faster, nothing lost


def target_layer(network: nn.Module) -> nn.Module:
    """The last convolutional stage of a Classifier's backbone, for every backbone the project builds."""
    backbone = network.backbone
    if hasattr(backbone, "layer4"):  # torchvision ResNets
        return backbone.layer4
    if hasattr(backbone, "conv_head") and hasattr(backbone, "bn2"):  # timm EfficientNet: bn2 holds the activation
        return backbone.bn2
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential) and isinstance(features[-1], nn.MaxPool2d):  # VGG: the map before the
        return [module for module in features if isinstance(module, nn.ReLU)][-1]      # final pool halves it
    if isinstance(features, nn.Sequential):  # EfficientNet-B0, ConvNeXt: the last stage is the last block
        return features[-1]
    raise UserError(f"no known last convolutional stage in a {type(backbone).__name__} backbone")


def torch_network(model) -> nn.Module:
    """The PyTorch network of a loaded model; an .onnx model (ONNX Runtime) has none to take gradients of."""
    network = getattr(model, "network", None)
    if not isinstance(network, nn.Module):
        raise UserError("explanations need the PyTorch model (model.pt): an .onnx file has no gradients to take; "
                        "pass --model model.pt")
    return network


def gradcam(network: nn.Module, images: torch.Tensor,
            class_indices: list[int] | np.ndarray | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N x H x W float32 heatmaps in [0, 1], N x C probabilities) of N x 3 x H x W images in [0, 1].

    class_indices: the class to explain per image; None = each image's predicted class.
    """
    device = next(network.parameters()).device
    captured = []

    def capture(module, inputs, output):
        # A fresh leaf that requires grad: the gradient exists even under a frozen backbone, and autograd
        # does not go back through the layers below it (no work, and nothing there is touched).
        captured.append(output.detach().requires_grad_(True))
        return captured[-1]

    modes = {module: module.training for module in network.modules()}
    handle = target_layer(network).register_forward_hook(capture)
    try:
        network.eval()  # BatchNorm uses, never updates, its running statistics; dropout is off
        # inference_mode(False): callers may sit inside torch.inference_mode, where autograd records nothing
        with torch.inference_mode(False), torch.enable_grad():
            batch = images.clone().to(device=device, dtype=torch.float32)  # clone: an inference tensor cannot be used
            logits = network(batch).float()
            chosen = logits.argmax(1) if class_indices is None else torch.as_tensor(class_indices, device=device)
            scores = logits.gather(1, chosen.long().view(-1, 1)).sum()  # images are independent in eval mode
            activations = captured[-1]
            gradients, = torch.autograd.grad(scores, activations)  # touches no parameter's .grad
            weights = gradients.mean((2, 3), keepdim=True)
            cam = torch.relu((weights * activations).sum(1, keepdim=True)).detach()
            cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            cam = torch.nan_to_num(cam)
            peak = cam.flatten(1).amax(1).view(-1, 1, 1)
            cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1), 0).clamp(0, 1)  # all-zero stays zero
            return cam.cpu().numpy().astype(np.float32), logits.detach().softmax(1).cpu().numpy()
    finally:
        handle.remove()
        for module, training in modes.items():  # each module's own mode: Classifier.train keeps BatchNorm in eval
            module.training = training


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def explain_images(model, images: np.ndarray, class_indices=None, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Heatmaps (N x S x S) of img_size x img_size uint8 RGB images, batch_size at a time."""
    network = torch_network(model)
    maps = [np.zeros((0, *images.shape[1:3]), np.float32)]
    for start in range(0, len(images), batch_size):
        chosen = None if class_indices is None else class_indices[start:start + batch_size]
        maps.append(gradcam(network, to_tensor(images[start:start + batch_size]), chosen)[0])
    return np.concatenate(maps)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap as a translucent jet colour map over an H x W x 3 uint8 RGB image."""
    if heatmap.shape != image.shape[:2]:
        heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)  # OpenCV's colour maps come out BGR
    return np.uint8(np.clip((1 - alpha) * image + alpha * colours, 0, 255).round())


def explain(model, image_or_path: str | Path | np.ndarray, class_name: str | None = None) -> tuple[np.ndarray, dict]:
    """(heatmap in [0, 1] of the original image's H x W, {class: probability}) of one image path or RGB array.

    class_name: the class to explain; None = the predicted one.
    """
    network = torch_network(model)
    if class_name is not None and class_name not in model.classes:
        raise UserError(f"unknown class '{class_name}': the model knows {', '.join(model.classes)}")
    image = image_or_path if isinstance(image_or_path, np.ndarray) else read_image(image_or_path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"images must be H x W x 3 uint8 RGB, not {image.shape} {image.dtype}")
    chosen = None if class_name is None else [model.classes.index(class_name)]
    heatmap, probabilities = gradcam(network, to_tensor(resize(image, model.img_size)[None]), chosen)
    # The model saw a squashed square; stretching its map back puts each value over the pixels it came from
    heatmap = cv2.resize(heatmap[0], (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(heatmap, 0, 1), dict(zip(model.classes, probabilities[0].tolist()))


EXPLANATION_NAMES = r"\d{4}-[\w-]*\.png"  # what explanation_name gives: the names explain_paths writes


def explanation_name(position: int, path: str | Path) -> str:
    """'0003-scan_01.png': the position keeps names apart (two folders' a.jpg); the stem keeps only characters
    valid everywhere (a non-UTF-8 byte arrives as a lone surrogate, which is not alphanumeric)."""
    stem = "".join(char if char.isalnum() or char in "-_" else "_" for char in Path(str(path)).stem)[:60]
    return f"{position:04d}-{stem}.png"


def title_of(probabilities: dict, top_k: int = 3, note: str = "") -> str:
    """'true beta | alpha 0.81, beta 0.12, gamma 0.07': the top classes, most probable first."""
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])[:top_k]
    return (f"{note} | " if note else "") + ", ".join(f"{name} {p:.2f}" for name, p in ranked)


def write_explanation(path: str | Path, image: np.ndarray, heatmap: np.ndarray, title: str) -> None:
    """One PNG: the image on the left, the heatmap over it on the right, the title above."""
    height, width = image.shape[:2]
    figure = Figure(figsize=(8, max(2.5, 4 * height / width) + 0.6))
    for axes, shown, name in zip(figure.subplots(1, 2), (image, overlay(image, heatmap)), ("image", "Grad-CAM")):
        axes.imshow(shown)
        axes.set_title(name, fontsize=8)
        axes.axis("off")
    figure.suptitle(title, fontsize=9)
    with atomic_write(Path(path)) as temp_name:
        figure.savefig(temp_name, format="png", dpi=110, bbox_inches="tight")


def explain_paths(model, paths: list, out_dir: str | Path, top_k: int = 3, notes: list[str] | None = None,
                  max_pixels: int | None = None, batch_size: int = BATCH_SIZE) -> dict:
    """One PNG per image file in out_dir (explanation_name), for its predicted class; {path: png path}.

    Files that do not decode are skipped with a warning. notes: a title prefix per path (e.g. the true class).
    """
    network, written = torch_network(model), {}
    out_dir = own_folder(Path(out_dir))  # never a link: nothing written through it
    for start in range(0, len(paths), batch_size):
        decoded = []
        for position in range(start, min(start + batch_size, len(paths))):
            try:
                decoded.append((position, read_image(paths[position], DISPLAY_SIDE, max_pixels)))
            except (BadImageError, OSError, cv2.error) as error:
                log.warning("warning: no explanation for %s: %s", paths[position], error)
        if not decoded:
            continue
        squares = np.stack([resize(image, model.img_size) for _, image in decoded])
        heatmaps, probabilities = gradcam(network, to_tensor(squares))
        for (position, image), heatmap, row in zip(decoded, heatmaps, probabilities):
            out = Path(out_dir) / explanation_name(position, paths[position])
            note = notes[position] if notes else ""
            write_explanation(out, image, heatmap, title_of(dict(zip(model.classes, row.tolist())), top_k, note))
            written[paths[position]] = out
    return written


def explain_evaluation(model, predictions, misclassified: np.ndarray, output_dir: str | Path,
                       count: int = 0) -> np.ndarray:
    """For evaluate(): the misclassified grid's images with their predicted class's heatmap over them, and
    output_dir/explained/ rewritten with full-size pictures of those images and of the `count` least confident
    correct ones. predictions: evaluate's table (path, label, predicted, confidence); misclassified: the
    images of its first wrong rows, in order. A model without gradients (.onnx) gets the images back as they were.
    """
    if not isinstance(getattr(model, "network", None), nn.Module):
        if count:
            torch_network(model)  # raises the UserError that says why
        return misclassified
    folder = own_folder(Path(output_dir) / "explained")  # never a link: nothing deleted or written through it
    for stale in folder.glob("*.png"):  # a previous run's pictures would mislead; anything else there stays
        remove_own(stale, EXPLANATION_NAMES)
    wrong = np.flatnonzero((predictions.label != predictions.predicted).to_numpy())[:len(misclassified)].tolist()
    correct = predictions[predictions.label == predictions.predicted].nsmallest(count, "confidence").index.tolist()
    rows = wrong + correct
    explain_paths(model, predictions.path.loc[rows].tolist(), folder,
                  notes=[f"true {predictions.label.loc[row]}" for row in rows])
    if not len(misclassified):
        return misclassified
    chosen = [model.classes.index(predictions.predicted.loc[row]) for row in wrong]
    heatmaps = explain_images(model, misclassified, chosen)
    return np.stack([overlay(image, heatmap) for image, heatmap in zip(misclassified, heatmaps)])
