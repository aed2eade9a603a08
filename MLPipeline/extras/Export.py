"""Take a trained model elsewhere: export it to ONNX or torch.export (.pt2), and run an .onnx file.

The exported graph takes what any image decoder gives: uint8 RGB images, N x img_size x img_size x 3 for any
N; it scales them to [0, 1] and normalises them inside, and returns float32 logits, N x classes. So a user in
another language only decodes, resizes and stacks. What they need to know (classes, img_size, mean, std,
arch, where the weights came from) travels in the file: every checkpoint field but the weights, each value
JSON-encoded, in the ONNX model's metadata_props, or in the .pt2 archive's extra file metadata.json.

onnxruntime is imported inside the functions that need it: importing MLPipeline stays light.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from MLPipeline.extras.Common import UserError, atomic_write, check_archive, log, progress_reporter
from MLPipeline.CreateDataset import to_model_input
from MLPipeline.extras.OutputFolder import check_room, check_write_target
from MLPipeline.ResNet_Model import Classifier
from MLPipeline.extras.Checkpoint import check_model_file, check_model_info, load_checkpoint

FORMATS = ("onnx", "pt2")
EXPORT_FORMAT = "doc-classifier-export/1"  # marks a file as exported by this project
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "metadata.json"  # the .pt2 archive's extra file
DIGEST_KEY = "sha256"  # the ONNX metadata entry holding the digest of the rest of the file (model_digest)
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
    check_write_target(out, "--out", folder=False, inputs=[model_path])
    if file_format == "onnx":  # before the work: the export is verified with ONNX Runtime
        import_onnx("--format onnx", "export --format pt2")
    network, checkpoint = load_checkpoint(model_path)
    check_free_space(out, checkpoint["state_dict"])
    model = Uint8Classifier(network).eval()
    example = torch.zeros(2, checkpoint["img_size"], checkpoint["img_size"], 3, dtype=torch.uint8)
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_batch())  # 2: 1 would fix the size
    metadata = {key: json.dumps(value) for key, value in checkpoint.items()  # the graph gives logits only: the
                if key not in ("state_dict", "unfamiliar_score")}  # unfamiliar-input score stays with model.pt
    metadata.update(export_format=json.dumps(EXPORT_FORMAT), usage=json.dumps(USAGE))
    with atomic_write(out) as temp_name:
        write_verified(temp_name, file_format, program, metadata, model, checkpoint["img_size"])
    return out


def check_free_space(out: Path, state_dict: dict) -> None:
    """Refuse to start an export the disk (or ulimit -f) cannot hold: torch.export.save aborts the whole process
    (SIGABRT, no Python exception) when a write fails under it. Twice the weights' size leaves room for the graph."""
    check_room(out, 2 * sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values()))


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
    model = onnx_program.model_proto
    model.metadata_props.add(key=DIGEST_KEY, value=model_digest(model))
    Path(path).write_bytes(model.SerializeToString())


def model_digest(model) -> str:
    """The sha256 of an ONNX ModelProto serialized without its DIGEST_KEY entry (removed from `model`), as a
    JSON string like every other metadata value.

    ONNX files carry no checksum, and ONNX Runtime runs changed weights as readily as the real ones: the
    digest written at export catches a file whose bytes changed since.
    """
    kept = [entry for entry in model.metadata_props if entry.key != DIGEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return json.dumps(hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest())


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
    if not difference <= allowed:  # a NaN difference (a model that diverged) fails too
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
    temperature: float = 1.0  # softmax(logits / T) are the calibrated probabilities (see Predict.TrainedModel)
    device: torch.device = torch.device("cpu")
    bf16: bool = False  # the graph runs as exported: no autocast (see Predict.TrainedModel)

    def network(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of N x 3 x S x S inputs in [0, 1] (what the data path gives the PyTorch model): turned back into
        the exact uint8 images they were made from, which is what the exported graph takes."""
        images = inputs.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0])

    def predictor(self):
        """What predict runs on batches of inputs (as TrainedModel's): the graph, which gives logits only."""
        return self.network

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Logits of decoded img_size x img_size uint8 RGB images, batch_size (default 64) at a time."""
        batch_size, outputs = batch_size or 64, [np.zeros((0, len(self.classes)), np.float32)]
        update = progress_reporter("predict", len(images))
        for start in range(0, len(images), batch_size):
            outputs += self.session.run([OUTPUT_NAME], {INPUT_NAME: images[start:start + batch_size]})
            update(start + batch_size)
        return torch.from_numpy(np.concatenate(outputs))

    outputs = logits  # what predict reads (TrainedModel's also holds the features): here the logits alone


FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def import_onnx(what: str, instead: str) -> tuple:
    """(onnx, onnxruntime), or one UserError saying what cannot work without them and what to do instead."""
    try:
        import onnx  # with onnxruntime, a second or so to import, and only the paths that use them need them
        import onnx.numpy_helper
        import onnxruntime
    except ImportError as error:
        raise UserError(f"{what} needs onnx and onnxruntime, which cannot be imported here ({error}): "
                        f"pip install onnx onnxruntime, or {instead}") from None
    return onnx, onnxruntime


def load_onnx_model(path: Path, device: str = "auto") -> OnnxModel:
    """Open an .onnx file exported by this project; ONNX Runtime runs it on the CPU."""
    if device not in ("auto", "cpu"):
        raise UserError(f"an .onnx model runs on the CPU here (ONNX Runtime); --device {device} is for model.pt: "
                        f"use --device cpu or auto")
    path = Path(path)
    check_model_file(path, "export one with `python engine.py export`")
    onnx, onnxruntime = import_onnx("an .onnx model", "use model.pt instead")
    check_archive(path, "ONNX model")  # its size, before it is read
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnx and ONNX Runtime raise their own kinds for files they cannot use
        raise UserError(f"{path} is not a readable ONNX model (corrupt, truncated or not ONNX: "
                        f"{type(error).__name__})") from None
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    if metadata.get("export_format") != json.dumps(EXPORT_FORMAT):
        raise UserError(f"{path} is an ONNX model, but not one exported by this project (its metadata lacks "
                        f"export_format); export one with `python engine.py export`")
    if metadata.get(DIGEST_KEY) != model_digest(model):
        raise UserError(f"{path} is damaged (its bytes changed after export: they no longer match the digest "
                        f"written with them); export it again")
    try:
        info = {key: json.loads(value) for key, value in metadata.items()}
    except ValueError:
        raise UserError(f"{path} has damaged metadata (not JSON): export it again") from None
    check_model_info(info, path)
    if not all(np.isfinite(onnx.numpy_helper.to_array(weights)).all() for weights in model.graph.initializer
               if weights.data_type in FLOAT_TYPES):
        raise UserError(f"{path} is damaged: some of its weights are not finite numbers (NaN or infinite); export "
                        f"it again")
    graph_input, graph_output = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    if graph_input[1:3] != [info["img_size"]] * 2 or graph_output[1] != len(info["classes"]):
        raise UserError(f"{path}'s metadata do not match its graph ({len(info['classes'])} classes and img_size "
                        f"{info['img_size']}, for inputs {graph_input} and outputs {graph_output}): export it again")
    return OnnxModel(session, info["classes"], info["img_size"], info, info.get("temperature", 1.0))
