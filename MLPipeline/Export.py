"""Take a trained model elsewhere: export it to ONNX or torch.export (.pt2), and run an .onnx file; and run
a frozen backbone in ONNX Runtime during training, where that is faster than PyTorch.

The exported graph takes what any image decoder gives: uint8 RGB images, N x img_size x img_size x 3 for any
N; it scales them to [0, 1] and normalises them inside, and returns float32 logits, N x classes. So a user in
another language only decodes, resizes and stacks. What they need to know (classes, img_size, mean, std,
arch, where the weights came from) travels in the file: every checkpoint field but the weights, each value
JSON-encoded, in the ONNX model's metadata_props, or in the .pt2 archive's extra file metadata.json.

onnxruntime is imported inside the functions that need it: importing MLPipeline stays light.
"""
from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from MLPipeline.Common import UserError, log, progress_reporter, save_atomically
from MLPipeline.CreateDataset import to_model_input
from MLPipeline.ResNet_Model import Classifier, check_model_file, load_checkpoint

FORMATS = ("onnx", "pt2")
EXPORT_FORMAT = "doc-classifier-export/1"  # marks a file as exported by this project
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "metadata.json"  # the .pt2 archive's extra file
USAGE = ("input 'images': uint8 RGB, N x img_size x img_size x 3 (resized without keeping the aspect ratio, "
         "OpenCV INTER_AREA); scaling and normalisation are inside. Output 'logits': float32, N x classes, "
         "in the order of 'classes'; softmax gives probabilities.")
TOLERANCE = 1e-4  # largest difference from PyTorch's logits allowed, relative to the logits' size (at least 1)


class Uint8Classifier(nn.Module):
    """The classifier behind the decoder: uint8 N x H x W x 3 RGB in, logits out (what gets exported)."""

    def __init__(self, network: Classifier):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(to_model_input(images))


def export_model(model_path: Path, file_format: str = "onnx", out: Path | None = None) -> Path:
    """Export a checkpoint to `out` (default: next to it, with the format's suffix); returns the path written.

    The file is written atomically, and only after the written file, loaded the way a user would load it,
    gave PyTorch's logits on a sample batch.
    """
    if file_format not in FORMATS:
        raise UserError(f"unknown export format '{file_format}': choose from {', '.join(FORMATS)}")
    model_path = Path(model_path)
    out = Path(out) if out else model_path.with_suffix(f".{file_format}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as model.{file_format}")
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out} is the model file itself; give another name, such as model.{file_format}")
    network, checkpoint = load_checkpoint(model_path)
    model = Uint8Classifier(network).eval()
    example = torch.zeros(2, checkpoint["img_size"], checkpoint["img_size"], 3, dtype=torch.uint8)
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_batch())  # 2: 1 would fix the size
    metadata = {key: json.dumps(value) for key, value in checkpoint.items() if key != "state_dict"}
    metadata.update(export_format=json.dumps(EXPORT_FORMAT), usage=json.dumps(USAGE))
    save_atomically(out, lambda temp_name: write_verified(temp_name, file_format, program, metadata, model,
                                                          checkpoint["img_size"]))
    return out


def dynamic_batch() -> dict:
    """The input's first dimension (the batch) may be any size; the name shows in the ONNX file."""
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}


def write_verified(path: str, file_format: str, program: torch.export.ExportedProgram, metadata: dict[str, str],
                   model: Uint8Classifier, img_size: int) -> None:
    """Write the file, load it back as a user would, and check that it gives the model's logits."""
    if file_format == "onnx":
        write_onnx(program, metadata, path)
        verify(model, load_onnx_model(Path(path), "cpu").logits, img_size)
        return
    write_pt2(program, metadata, path)
    with open(path, "rb") as file:
        exported = torch.export.load(file).module()
    verify(model, lambda images: exported(torch.from_numpy(images)), img_size)


def write_onnx(program: torch.export.ExportedProgram, metadata: dict[str, str], path: str) -> None:
    # The dynamo exporter, from the same torch.export program as .pt2: one trace for both formats. It needs
    # onnx and onnxscript; the classic TorchScript exporter is deprecated.
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_batch())
    onnx_program.model.metadata_props.update(metadata)
    onnx_program.model.doc_string = USAGE
    onnx_program.save(path)


def write_pt2(program: torch.export.ExportedProgram, metadata: dict[str, str], path: str) -> None:
    with open(path, "wb") as file:  # a file object: torch.export.save warns about names not ending in .pt2
        torch.export.save(program, file, extra_files={METADATA_FILE: json.dumps(metadata)})


def verify(model: Uint8Classifier, run: Callable[[np.ndarray], torch.Tensor], img_size: int) -> None:
    """Refuse an export whose logits differ from PyTorch's on a batch of 3 random images (not the traced 2)."""
    images = np.random.default_rng(0).integers(0, 256, (3, img_size, img_size, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = model(torch.from_numpy(images))
        difference = (run(images) - expected).abs().max().item()
    allowed = TOLERANCE * max(1.0, expected.abs().max().item())
    if difference > allowed:
        raise RuntimeError(f"the exported model's logits differ from PyTorch's by {difference:.3g} "
                           f"(allowed {allowed:.3g}); nothing was written")
    log.info("verified: the exported model gives PyTorch's logits (largest difference %.2g)", difference)


@dataclass
class OnnxModel:
    """An exported .onnx file run with ONNX Runtime, with what predict() and evaluate() use of a model."""
    session: object  # onnxruntime.InferenceSession
    classes: list[str]
    img_size: int
    info: dict  # the metadata: the checkpoint's fields other than the weights

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Logits of decoded img_size x img_size uint8 RGB images, batch_size (default 64) at a time."""
        batch_size, outputs = batch_size or 64, [np.zeros((0, len(self.classes)), np.float32)]
        update = progress_reporter("predict", len(images))
        for start in range(0, len(images), batch_size):
            outputs += self.session.run([OUTPUT_NAME], {INPUT_NAME: images[start:start + batch_size]})
            update(start + batch_size)
        return torch.from_numpy(np.concatenate(outputs))


def load_onnx_model(path: Path, device: str = "auto") -> OnnxModel:
    """Open an .onnx file exported by this project; ONNX Runtime runs it on the CPU."""
    if device not in ("auto", "cpu"):
        raise UserError(f"an .onnx model runs on the CPU here (ONNX Runtime); --device {device} is for model.pt: "
                        f"use --device cpu or auto")
    path = Path(path)
    check_model_file(path, "export one with `python engine.py export`")
    import onnxruntime  # a second or so to import, and only this path needs it
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own kinds for files it cannot use
        raise UserError(f"{path} is not a readable ONNX model (corrupt, truncated or not ONNX: "
                        f"{type(error).__name__})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get("export_format") != json.dumps(EXPORT_FORMAT):
        raise UserError(f"{path} is an ONNX model, but not one exported by this project (its metadata lacks "
                        f"export_format); export one with `python engine.py export`")
    info = {key: json.loads(value) for key, value in metadata.items()}
    return OnnxModel(session, info["classes"], info["img_size"], info)


# --- A frozen backbone in ONNX Runtime, during training

BACKBONE_RUNTIMES = ("auto", "pytorch", "onnxruntime")
MIN_IMAGES_TO_COMPARE = 500  # a run pushing fewer images through the backbone: not worth an export and a trial


class FeaturesOf(nn.Module):
    """model.features as a module of its own: what is exported."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


class FrozenBackbone:
    """Computes a frozen backbone's features, like model.features: with PyTorch, or on the CPU with ONNX Runtime.

    ONNX Runtime runs some networks much faster on a CPU and others slower (2-core CPU, features per second
    against PyTorch's, channels_last: EfficientNet-Lite0 at 200 px 2.75x, ResNet50 1.3-1.5x, ResNet18 at 64 px
    0.8x). runtime 'auto': a run that pushes at least MIN_IMAGES_TO_COMPARE images through the backbone on
    the CPU exports it (1-2 s), runs the first batch in both and keeps the faster; 'onnxruntime' always
    exports on the CPU; 'pytorch', GPUs, and any export that fails or gives other features use PyTorch.
    The choice is made at the first call, so a run whose features all come from the cache exports nothing.
    """

    def __init__(self, model: Classifier, device: torch.device, runtime: str = "auto", images: int = 0):
        self.model, self.runtime = model, runtime
        self.name = "pytorch"
        try_onnx = runtime == "onnxruntime" or (runtime == "auto" and images >= MIN_IMAGES_TO_COMPARE)
        if try_onnx and device.type != "cpu":
            try_onnx = False
            if runtime == "onnxruntime":
                log.warning("warning: ONNX Runtime runs the backbone on the CPU only; on %s PyTorch runs it", device)
        self.run: Callable[[torch.Tensor], torch.Tensor] | None = None if try_onnx else model.features

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
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


def onnx_features_of(model: Classifier, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
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
