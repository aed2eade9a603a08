"""Every training option is one flag of engine.py (listed in add_train_options) and one field of RunConfig
(the recipe's TrainConfig and the tool's options), with the same name and default; RunConfig checks them."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

import engine
from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Run import RunConfig
from tests.conftest import ROOT

WHERE_DEFAULTS = {"data_dir": "`Data/`", "output_dir": "`output/`", "workers": "min(4, CPUs)"}  # machine-dependent


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    engine.add_train_options(parser)
    return parser


def options_table() -> str:
    """docs/options.md's table of training options, made from engine.py's flags."""
    rows = ["| option | default | what |", "|---|---|---|"]
    for action in train_parser()._actions[1:]:
        default = WHERE_DEFAULTS.get(action.dest, f"`{action.default}`")
        text = action.help.replace(" (default: %(default)s)", "").replace("|", chr(92) + "|")
        rows.append(f"| `{action.option_strings[0]}` | {default} | {text} |")
    return "\n".join(rows)


def test_the_docs_list_every_option_as_defined():
    assert options_table() in (ROOT / "docs" / "options.md").read_text(), (
        "docs/options.md's option table differs from engine.py's flags; paste this in its place:\n" + options_table())


def test_the_cli_has_one_flag_per_option_with_its_default(tmp_path):
    args = vars(train_parser().parse_args([]))
    assert set(args) == {option.name for option in dataclasses.fields(RunConfig)}
    for option in dataclasses.fields(RunConfig):
        if option.name not in ("data_dir", "output_dir"):  # engine.py's own: next to engine.py
            assert args[option.name] == option.default, option.name
    parsed = train_parser().parse_args(["--no-feature-cache", "--backbone-lr", "0.5", "--cache-dir", str(tmp_path)])
    assert (parsed.feature_cache, parsed.backbone_lr, parsed.cache_dir) == (False, 0.5, tmp_path)


@pytest.mark.parametrize("name, value", [("epochs", 0), ("lr", -1.0), ("img_size", 8), ("val_size", 1.5),
                                         ("workers", -1), ("backbone", "nope"), ("schedule", "linear"),
                                         ("lr", float("inf")), ("lr", float("nan")), ("lr", 1e300),
                                         ("seed", 2**64), ("folds", 1), ("class_weights", "heavy"),
                                         ("epochs", 1.5), ("batch_size", True), ("precision", "fp16")])
def test_each_check_names_its_flag(name, value):
    with pytest.raises(UserError, match="--" + name.replace("_", "-")):
        RunConfig(**{name: value})
