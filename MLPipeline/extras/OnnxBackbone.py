"""A frozen backbone run by ONNX Runtime on the CPU during training, where that is faster than PyTorch.

With --backbone-runtime auto or onnxruntime, the recipe computes a frozen backbone's features with a
FrozenBackbone instead of model.features: the same call, answered by an in-memory ONNX export of the
backbone when that is faster. onnxruntime is imported only when it is used.
"""
from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from MLPipeline.extras.Common import log

MIN_IMAGES_TO_COMPARE = 500  # a run pushing fewer images through the backbone: not worth an export and a trial
TOLERANCE = 1e-4  # largest difference from PyTorch's features allowed, relative to their size (at least 1)
INPUT_NAME = "images"


class FeaturesOf(nn.Module):
    """model.features as a module of its own: what is exported."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


class FrozenBackbone(nn.Module):
    """Computes a frozen backbone's features, like model.features: with PyTorch, or on the CPU with ONNX Runtime.

    ONNX Runtime runs some networks much faster on a CPU and others slower (docs/speed.md). runtime 'auto': a run
    that pushes at least MIN_IMAGES_TO_COMPARE images through the backbone on the CPU exports it, runs the first
    batch in both and keeps the faster; 'onnxruntime' always exports on the CPU; GPUs, and any export that
    fails or gives other features, use PyTorch. The choice is made at the first call, so a run whose features
    all come from the cache exports nothing.
    """

    def __init__(self, model: nn.Module, device: torch.device, runtime: str = "auto", images: int = 0):
        super().__init__()
        self.model, self.runtime = model, runtime
        self.name = "pytorch"
        try_onnx = runtime == "onnxruntime" or (runtime == "auto" and images >= MIN_IMAGES_TO_COMPARE)
        if try_onnx and device.type != "cpu":
            try_onnx = False
            if runtime == "onnxruntime":
                log.warning("warning: ONNX Runtime runs the backbone on the CPU only; on %s PyTorch runs it", device)
        self.run: Callable[[torch.Tensor], torch.Tensor] | None = None if try_onnx else model.features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.run is not None:
            return self.run(images)
        self.run, features = self.choose(images)
        return features

    def choose(self, images: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """ONNX Runtime or PyTorch, from the first batch: same features (within TOLERANCE), and faster.
        Returns the choice and its features of `images`."""
        try:
            onnx_features = onnx_features_of(self.model, images.shape[-1])
            (pytorch_speed, expected), (onnx_speed, got) = (timed(run, images) for run in
                                                            (self.model.features, onnx_features))
            if got.shape != expected.shape:
                raise ValueError(f"features of shape {tuple(got.shape)}, not {tuple(expected.shape)}")
            difference = (got - expected).abs().max().item()
        except Exception as error:  # the exporter and ONNX Runtime raise many kinds
            log.warning("warning: the backbone could not run in ONNX Runtime (%s: %s); PyTorch runs it",
                        type(error).__name__, (str(error).strip().splitlines() or [""])[0])
            return self.model.features, self.model.features(images)
        if difference > TOLERANCE * max(1.0, expected.abs().max().item()):
            log.warning("warning: ONNX Runtime's features differ from PyTorch's by %.3g; PyTorch runs the backbone",
                        difference)
            return self.model.features, expected
        if self.runtime == "auto" and onnx_speed <= pytorch_speed:
            log.info("backbone: PyTorch (%.1f images/s; ONNX Runtime %.1f)", pytorch_speed, onnx_speed)
            return self.model.features, expected
        self.name = "onnxruntime"
        log.info("backbone: ONNX Runtime (%.1f images/s; PyTorch %.1f)", onnx_speed, pytorch_speed)
        return onnx_features, got


def onnx_features_of(model: nn.Module, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """model.features exported to ONNX in memory, as a function run by ONNX Runtime on the CPU, on as many
    threads as PyTorch uses."""
    import onnxruntime
    buffer = io.BytesIO()
    with torch.inference_mode(False), warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated, but exports ResNet50 in 2 s where the dynamo one
        # (export_model's) takes 11: paid by every run that uses this.
        warnings.simplefilter("ignore")
        # The exporter puts the module back in the mode it found it in: the model's own, not a new module's.
        torch.onnx.export(FeaturesOf(model).train(model.training), (torch.rand(1, 3, img_size, img_size),),
                          buffer, dynamo=False, input_names=[INPUT_NAME], output_names=["features"],
                          dynamic_axes={INPUT_NAME: {0: "n"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {INPUT_NAME: images.contiguous().numpy()})[0])


def timed(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(images per second, output) of the second of two calls (the first pays for first-call allocations)."""
    with torch.no_grad():
        run(images)
        start = time.perf_counter()
        output = run(images)
    return len(images) / (time.perf_counter() - start), output
