"""Export: the .onnx and .pt2 files give PyTorch's logits, carry the model's metadata, serve predict and
evaluate, and refuse what they cannot do without leaving a file behind."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import engine
from MLPipeline import evaluate, load_model, predict
from MLPipeline.extras import Export
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Data import load_images
from MLPipeline.extras.Run import train
from MLPipeline.extras.Files import list_images
from tests.conftest import ROOT, run_engine

EXPORT_ONLY = {"export_format": Export.EXPORT_FORMAT, "usage": Export.USAGE}  # what an export adds


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A small trained model, exported to ONNX with the CLI: (output folder, the export's CompletedProcess)."""
    output_dir = tmp_path_factory.mktemp("export")
    train(TrainConfig(data_dir=tiny_data, output_dir=output_dir, epochs=1, img_size=32, weights="none",
                      backbone="resnet18", precision="fp32"))  # fp32: ONNX Runtime's, to the last 1e-4
    return output_dir, run_engine("export", "--model", output_dir / "model.pt")


@pytest.fixture(scope="module")
def pt2(trained):
    return Export.export_model(trained[0] / "model.pt", "pt2")


@pytest.fixture(scope="module")
def images(tiny_data) -> np.ndarray:
    return load_images([str(path) for path in list_images(tiny_data)[::4]], 32)[0]  # 6 images, every class


def pytorch_logits(trained, images: np.ndarray) -> np.ndarray:
    return load_model(trained[0] / "model.pt", "cpu").logits(images).numpy()


def test_cli_export_writes_the_onnx_file_next_to_the_model(trained):
    output_dir, result = trained
    assert result.returncode == 0, result.stderr
    assert f"wrote {output_dir / 'model.onnx'}" in result.stdout and "verified" in result.stderr
    assert "Removed" not in result.stdout + result.stderr  # the exporter's notes on its passes are silenced
    assert not [path for path in output_dir.iterdir() if path.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_agrees_with_pytorch(trained, images, batch):
    session = onnxruntime.InferenceSession(str(trained[0] / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images[:batch]})
    np.testing.assert_allclose(logits, pytorch_logits(trained, images[:batch]), rtol=0, atol=1e-4)


def exported_metadata(trained, pt2, file_format: str) -> dict:
    """The metadata an exported file carries, each value JSON-decoded."""
    if file_format == "onnx":
        model = onnx.load(str(trained[0] / "model.onnx"), load_external_data=False)
        return {prop.key: json.loads(prop.value) for prop in model.metadata_props}
    extra_files = {"metadata.json": ""}
    torch.export.load(pt2, extra_files=extra_files)
    return {key: json.loads(value) for key, value in json.loads(extra_files["metadata.json"]).items()}


@pytest.mark.parametrize("file_format", ["onnx", "pt2"])
def test_metadata_round_trip_every_checkpoint_field_but_the_weights(trained, pt2, file_format):
    checkpoint = torch.load(trained[0] / "model.pt", weights_only=True)
    fields = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "unfamiliar_score")}
    assert {"classes", "arch", "img_size", "mean", "std", "head", "weights_source", "pretrained", "created_utc",
            "torch_version", "format", "training"} <= set(fields)
    metadata = exported_metadata(trained, pt2, file_format)
    if file_format == "onnx":  # ONNX has no checksum of its own: the digest of the rest of the file
        assert re.fullmatch(r"[0-9a-f]{64}", metadata.pop(Export.DIGEST_KEY))
    assert metadata == {**fields, **EXPORT_ONLY}  # every field, equal once decoded; nothing else but the two
    assert metadata["arch"] == "resnet18" and metadata["img_size"] == 32


def test_onnx_input_is_uint8_images_of_any_batch(trained):
    model = onnx.load(str(trained[0] / "model.onnx"), load_external_data=False)
    (images,) = model.graph.input
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [dim.dim_param or dim.dim_value for dim in images.type.tensor_type.shape.dim] == ["batch", 32, 32, 3]


def test_pt2_loads_with_torch_export_load_agrees_and_carries_metadata(trained, pt2, images):
    assert pt2 == trained[0] / "model.pt2"
    extra_files = {"metadata.json": ""}
    network = torch.export.load(pt2, extra_files=extra_files).module()
    assert json.loads(json.loads(extra_files["metadata.json"])["export_format"]) == Export.EXPORT_FORMAT
    for batch in (1, 5):
        np.testing.assert_allclose(network(torch.from_numpy(images[:batch])).detach().numpy(),
                                   pytorch_logits(trained, images[:batch]), rtol=0, atol=1e-4)


def test_cli_predict_with_the_onnx_file_gives_the_labels_of_model_pt(trained, tiny_data, cli):
    results = [cli("predict", tiny_data, "--model", trained[0] / name, "--no-review")  # .onnx: no unfamiliar score
               for name in ("model.pt", "model.onnx")]
    assert all(result.returncode == 0 for result in results), [result.stderr for result in results]
    labels = [[line.split("\t")[:2] for line in result.stdout.splitlines()] for result in results]
    assert len(labels[0]) == 24 and labels[0] == labels[1]


def test_evaluate_with_the_onnx_file_scores_as_model_pt(trained, tiny_data, tmp_path):
    reports = [evaluate(load_model(trained[0] / name, "cpu"), tiny_data, tmp_path / name)
               for name in ("model.pt", "model.onnx")]
    for key in ("accuracy", "confusion_matrix", "model_info"):
        assert reports[0][key] == reports[1][key]


def bad_model_file(case: str, tmp_path):
    files = {"missing": tmp_path / "missing.pt", "folder": tmp_path, "garbage": tmp_path / "garbage.pt"}
    files["garbage"].write_bytes(np.random.default_rng(0).bytes(5000))
    return files[case]


@pytest.mark.parametrize("case", ["missing", "folder", "garbage"])
def test_export_of_a_bad_model_file_exits_2_with_one_error_line(case, tmp_path, capsys):
    model = bad_model_file(case, tmp_path)
    code = engine.main(["export", "--model", str(model), "--out", str(tmp_path / "out.onnx")])
    errors = capsys.readouterr().err.splitlines()
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and str(model) in errors[0], errors
    assert not (tmp_path / "out.onnx").exists()


def foreign_onnx(path):
    """A valid ONNX model that this project did not export (an Identity, no metadata)."""
    tensor = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign", [tensor],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


def unusable_model(case: str, pt2, tmp_path):
    if case == "foreign":
        return foreign_onnx(tmp_path / "foreign.onnx")
    if case == "garbage":
        return bad_model_file("garbage", tmp_path).rename(tmp_path / "garbage.onnx")
    return pt2


@pytest.mark.parametrize("case, message", [("foreign", "not one exported by this project"),
                                           ("garbage", "not a readable ONNX model"),
                                           ("pt2", "torch.export.load")], ids=["foreign", "garbage", "pt2"])
def test_predict_refuses_an_unusable_exported_file(case, message, pt2, tiny_data, tmp_path, capsys):
    model = unusable_model(case, pt2, tmp_path)
    code = engine.main(["predict", str(tiny_data / "alpha"), "--model", str(model)])
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert code == 2 and captured.out == "" and len(errors) == 1, captured.err
    assert message in errors[0] and str(model) in errors[0]


def test_an_export_that_fails_while_writing_leaves_the_previous_file(trained, tmp_path, monkeypatch):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"the previous export")

    def disk_full(program, file, **kwargs):
        file.write(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch.export, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        Export.export_model(trained[0] / "model.pt", "pt2", out)
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"the previous export"


@pytest.mark.parametrize("file_format", ["onnx", "pt2"])
def test_an_export_that_does_not_give_pytorchs_logits_is_not_written(trained, tmp_path, monkeypatch, file_format):
    monkeypatch.setattr(Export, "TOLERANCE", -1.0)  # no file can pass: the check must run on every export
    with pytest.raises(RuntimeError, match="differ from PyTorch's"):
        Export.export_model(trained[0] / "model.pt", file_format, tmp_path / f"model.{file_format}")
    assert list(tmp_path.iterdir()) == []


def test_readme_onnx_example_runs_without_this_project_and_agrees_with_predict(trained, tiny_data, tmp_path):
    """docs/export.md's ONNX Runtime example, verbatim, in isolated mode (no access to MLPipeline)."""
    example = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```", (ROOT / "docs" / "export.md").read_text(), re.S)
    (tmp_path / "output").mkdir()
    shutil.copy(trained[0] / "model.onnx", tmp_path / "output" / "model.onnx")
    paths = [str(path) for path in list_images(tiny_data)[::4]]
    result = subprocess.run([sys.executable, "-I", "-c", example.group(1), *paths], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = predict(load_model(trained[0] / "model.pt", "cpu"), paths)
    assert [line.split()[:2] for line in result.stdout.splitlines()] == expected[["input", "label"]].values.tolist()


def test_an_onnx_file_is_refused_on_cuda_with_one_error_line(trained, tiny_data, capsys):
    code = engine.main(["predict", str(tiny_data / "alpha"), "--model", str(trained[0] / "model.onnx"),
                        "--device", "cuda"])
    errors = capsys.readouterr().err.splitlines()
    assert code == 2 and len(errors) == 1 and "runs on the CPU" in errors[0], errors
