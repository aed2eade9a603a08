"""Every training option is defined once, in TrainConfig: the CLI, the checks and docs/options.md follow from it."""
from __future__ import annotations

import dataclasses

import pytest

import engine
from MLPipeline.extras.Config import RunConfig as TrainConfig
from MLPipeline.CreateDataset import UserError
from tests.conftest import ROOT

README_DEFAULTS = {"data_dir": "`Data/`", "output_dir": "`output/`", "cache_dir": "`OUTPUT_DIR/cache`",
                   "workers": "min(4, CPUs)"}  # defaults that depend on where or what the machine is


def flag(option: dataclasses.Field) -> str:
    name = option.name.replace("_", "-")
    return f"--no-{name}" if option.default is True else f"--{name}"


def options_table() -> str:
    """docs/options.md's table of training options, made from TrainConfig."""
    rows = ["| option | default | what |", "|---|---|---|"]
    for option in dataclasses.fields(TrainConfig):
        default = README_DEFAULTS.get(option.name, f"`{option.default}`")
        rows.append(f"| `{flag(option)}` | {default} | {option.metadata['help'].replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def test_the_docs_list_every_option_as_defined():
    assert options_table() in (ROOT / "docs" / "options.md").read_text(), (
        "docs/options.md's option table differs from TrainConfig; paste this in its place:\n" + options_table())


def test_the_cli_has_one_flag_per_option_with_its_default(tmp_path):
    args = engine.parse_args(["train"])
    for option in dataclasses.fields(TrainConfig):
        assert hasattr(args, option.name)
        if option.name not in engine.CLI_DEFAULTS:
            assert getattr(args, option.name) == option.default
    parsed = engine.parse_args(["train", "--no-feature-cache", "--backbone-lr", "0.5", "--cache-dir", str(tmp_path)])
    assert (parsed.feature_cache, parsed.backbone_lr, parsed.cache_dir) == (False, 0.5, tmp_path)


@pytest.mark.parametrize("name, value", [("epochs", 0), ("lr", -1.0), ("img_size", 8), ("val_size", 1.5),
                                         ("workers", -1), ("backbone", "nope"), ("schedule", "linear"),
                                         ("lr", float("inf")), ("lr", float("nan")), ("lr", 1e300),
                                         ("seed", 2**64), ("folds", 1), ("class_weights", "heavy")])
def test_each_check_names_its_flag(name, value):
    with pytest.raises(UserError, match="--" + name.replace("_", "-")):
        TrainConfig(**{name: value}).check()
