"""The layout a reader relies on: the recipe (CreateDataset, ResNet_Model, Train) is a leaf that imports
nothing of the project but itself, the machinery (MLPipeline/extras) never is imported by it, and importing
the recipe loads few lines and none of the optional dependencies."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.conftest import ROOT

RECIPE = {"CreateDataset", "ResNet_Model", "Train"}


def project_imports(path) -> set[str]:
    """The project modules a file imports, at its top or inside its functions, as dotted names under MLPipeline."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "MLPipeline":
            names = node.module.split(".")[1:]
            imported |= {".".join(names)} if names else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("MLPipeline.")}
    return imported


def test_the_recipe_imports_only_the_recipe():
    imports = {name: project_imports(ROOT / "MLPipeline" / f"{name}.py") for name in RECIPE}
    assert all(modules <= RECIPE for modules in imports.values()), imports


def test_the_machinery_imports_the_recipe_and_itself_only():
    for path in (ROOT / "MLPipeline" / "extras").glob("*.py"):
        outside = {name for name in project_imports(path) if name not in RECIPE and not name.startswith("extras")}
        assert not outside, (path.name, outside)


def test_the_rule_is_checked_on_real_imports():
    """The check above would catch a recipe file that imported the machinery (here: a made-up one)."""
    assert project_imports_of_text("def f():\n    from MLPipeline.extras.Common import log\n") == {"extras.Common"}


def project_imports_of_text(text: str) -> set[str]:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "module.py"
        path.write_text(text)
        return project_imports(path)


def python_prints(script: str) -> str:
    """What a fresh interpreter in the project's root prints running `script` (a fresh one: nothing imported)."""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_recipe_loads_at_most_5_modules_and_800_lines():
    modules, lines = json.loads(python_prints(
        "import sys, json, MLPipeline.Train; mods = sorted(m for m in sys.modules if m.split('.')[0] == "
        "'MLPipeline'); print(json.dumps([mods, sum(len(open(sys.modules[m].__file__).read().splitlines()) "
        "for m in mods)]))"))
    assert len(modules) <= 5 and lines <= 800, (modules, lines)
    assert not any(module.startswith("MLPipeline.extras") for module in modules)


def test_importing_the_recipe_loads_no_optional_dependency():
    assert python_prints("import sys, MLPipeline.Train, MLPipeline.extras.Predict; print(sorted(name for name in "
                         "('onnx', 'onnxruntime', 'onnxscript', 'timm', 'pillow_heif') if name in sys.modules))") == "[]"
