"""The layout a reader relies on: short recipe files, imports that flow one way, and a recipe that loads
none of the optional machinery's dependencies."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

RECIPE = ("CreateDataset", "ResNet_Model", "Train", "Predict")
# Who may import whom: a module imports only modules of a lower level (the machinery may use each other).
LEVELS = {"engine": 5, "Train": 4, "Predict": 4, "Config": 3, "Export": 3, "Explain": 3, "CreateDataset": 2,
          "ResNet_Model": 2, "Common": 0}
MACHINERY = 1  # every other module of MLPipeline


def level(module: str) -> int:
    return LEVELS.get(module, MACHINERY)


def project_imports(path) -> set[str]:
    """The MLPipeline modules a file imports, at its top or inside its functions."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("MLPipeline"):
            parts = node.module.split(".")
            imported |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("MLPipeline.")}
    return imported


def test_recipe_files_are_at_most_300_lines():
    lengths = {name: len((ROOT / "MLPipeline" / f"{name}.py").read_text().splitlines()) for name in RECIPE}
    assert all(length <= 300 for length in lengths.values()), lengths


def test_no_module_imports_one_above_it():
    modules = {path.stem: path for path in (ROOT / "MLPipeline").glob("*.py") if path.stem != "__init__"}
    modules["engine"] = ROOT / "engine.py"
    upward = {(name, other) for name, path in modules.items() for other in project_imports(path)
              if other in modules and other != name
              and (level(other) > level(name) or (level(other) == level(name) and level(name) != MACHINERY))}
    assert not upward, upward


def test_importing_the_recipe_loads_no_optional_dependency():
    script = ("import sys, MLPipeline.Train, MLPipeline.extras.Predict; "
              "print(sorted(name for name in ('onnx', 'onnxruntime', 'onnxscript', 'timm', 'pillow_heif') "
              "if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
