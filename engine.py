"""Command line: train (the default), predict, evaluate, export, make-demo-data.

    python engine.py                      # train with the original's settings on Data/
    python engine.py predict photo.jpg    # classify images with output/model.pt
    python engine.py export               # output/model.onnx, for ONNX Runtime in any language
    python engine.py --help               # every command and option
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import sys
from pathlib import Path

import cv2
import pandas as pd
import torch

from MLPipeline import Report
from MLPipeline.Common import UserError, is_main_process
from MLPipeline.Export import FORMATS, export_model
from MLPipeline.Predict import evaluate, load_model, predict
from MLPipeline.SyntheticData import make_demo_data
from MLPipeline.Train import TrainConfig, check_option, train

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "Data"
DEFAULT_OUTPUT_DIR = HERE / "output"
DEFAULT_MODEL = DEFAULT_OUTPUT_DIR / "model.pt"
COMMANDS = ("train", "predict", "evaluate", "export", "make-demo-data")


def run_train(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or DEFAULT_DATA_DIR
    config = TrainConfig(**{**{name: getattr(args, name) for name in TRAIN_OPTIONS}, "data_dir": data_dir})
    config.check()  # flag errors before any demo data is written; train() checks again for API callers
    if args.data_dir is None and holds_nothing_but_readme(data_dir):
        logging.info("%s holds no images: generating the demo dataset there first "
                     "(python engine.py make-demo-data; put your own images there instead to train on them)", data_dir)
        make_demo_data(data_dir)
    train(config)
    return 0


def holds_nothing_but_readme(folder: Path) -> bool:
    """The untouched Data/ of a fresh clone: demo data may go there without mixing with anyone's files."""
    return not folder.exists() or all(path.name == "README.md" or path.name.startswith(".")
                                      for path in folder.iterdir())


def run_predict(args: argparse.Namespace) -> int:
    if args.csv and args.csv.is_dir():
        raise UserError(f"--csv {args.csv} is a folder; give a file name such as predictions.csv")
    check_option(CONFIG_OPTIONS["max_pixels"], args.max_pixels)
    model = load_model(args.model, args.device)
    results = predict(model, args.paths, max_pixels=args.max_pixels)
    if results.empty:
        raise UserError(f"no image files found in {', '.join(map(str, args.paths))}")
    if not is_main_process():  # under torchrun every process has the whole table; rank 0 reports it
        return 2 if (results.error != "").any() else 0
    for _, row in results[results.error == ""].iterrows():  # the failed ones were named as they were skipped
        ranked = sorted(model.classes, key=lambda name: -row[f"p_{name}"])[:args.top_k]
        print(f"{row['input']}\t" + "\t".join(f"{name} {row[f'p_{name}']:.3f}" for name in ranked))
    if args.csv:
        Report.write_csv(Path(args.csv), results)
    failed = (results.error != "").sum()
    if failed:
        print(f"error: {failed} of {len(results)} input(s) could not be classified (named above)", file=sys.stderr)
        return 2
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    check_option(CONFIG_OPTIONS["max_pixels"], args.max_pixels)
    model = load_model(args.model, args.device)
    report = evaluate(model, args.data_dir, args.output_dir, args.max_pixels)
    if not is_main_process():
        return 0
    print(f"accuracy {100 * report['accuracy']:.2f}% on {report['images']} images "
          f"(model backbone {'pretrained' if model.info['pretrained'] else 'NOT pretrained'})")
    print(pd.DataFrame(report["per_class"]).to_string(index=False, float_format="%.3f"))
    print(f"outputs in {args.output_dir}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = export_model(args.model, args.format, args.out)
    print(f"wrote {out}: uint8 RGB images in, logits out; classes, image size and normalisation in its metadata "
          f"(README: Export and deploy)")
    return 0


def run_make_demo_data(args: argparse.Namespace) -> int:
    counts = make_demo_data(args.out, args.per_class, args.seed, force=args.force)
    print(f"wrote {sum(counts.values())} demo images to {args.out}: "
          + ", ".join(f"{count} {name}" for name, count in counts.items()))
    return 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default) uses the GPU when PyTorch sees one")


CONFIG_OPTIONS = {option.name: option for option in dataclasses.fields(TrainConfig)}
TRAIN_OPTIONS = tuple(CONFIG_OPTIONS)
CLI_DEFAULTS = {"data_dir": None, "output_dir": DEFAULT_OUTPUT_DIR}  # Data/ and output/ next to engine.py


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, placed in the help by its group."""
    groups = {"": parser}
    for option in CONFIG_OPTIONS.values():
        if option.metadata["group"] not in groups:
            groups[option.metadata["group"]] = parser.add_argument_group(option.metadata["group"])
        add_option(groups[option.metadata["group"]], option)


def add_option(parser: argparse.ArgumentParser, option: dataclasses.Field) -> None:
    """The flag of a TrainConfig field on a parser (or a group of one): name, default, help, choices from the field."""
    rules, default = option.metadata, CLI_DEFAULTS.get(option.name, option.default)
    flag = "--" + option.name.replace("_", "-")
    if isinstance(option.default, bool):  # --augment / --no-augment
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=rules["help"])
        return
    parser.add_argument(flag, type=rules["kind"], default=default, choices=rules["choices"] or None,
                        help=rules["help"] + ("" if default is None else " (default: %(default)s)"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="engine.py", description="Transfer-learning document classifier "
                                     "(ResNet50). With no command: train on Data/ with the original's settings.")
    commands = parser.add_subparsers(dest="command_name", metavar="{" + ",".join(COMMANDS) + "}")

    trainer = commands.add_parser("train", help="train and save output/model.pt (the default command)")
    trainer.set_defaults(command=run_train)
    add_train_options(trainer)

    predictor = commands.add_parser("predict", help="classify image files or folders with a trained model")
    predictor.set_defaults(command=run_predict)
    predictor.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    predictor.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    predictor.add_argument("--csv", type=Path, help="also write every class probability per image here")
    predictor.add_argument("--top-k", type=positive_int, default=1, help="how many classes to print per image")
    add_device_option(predictor)
    add_option(predictor, CONFIG_OPTIONS["max_pixels"])

    evaluator = commands.add_parser("evaluate", help="score a trained model on a labelled folder")
    evaluator.set_defaults(command=run_evaluate)
    evaluator.add_argument("data_dir", type=Path, help="folder with one sub-folder per class")
    evaluator.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    evaluator.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR / "evaluation")
    add_device_option(evaluator)
    add_option(evaluator, CONFIG_OPTIONS["max_pixels"])

    exporter = commands.add_parser("export", help="write the trained model as ONNX (or torch.export .pt2) for use "
                                   "without this project")
    exporter.set_defaults(command=run_export)
    exporter.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    exporter.add_argument("--format", choices=FORMATS, default="onnx",
                          help="onnx (default; ONNX Runtime, any language) or pt2 (torch.export.load)")
    exporter.add_argument("--out", type=Path, help="file to write (default: next to --model, with the format's "
                          "suffix)")

    demo = commands.add_parser("make-demo-data", help="write the synthetic demo dataset of fake documents")
    demo.set_defaults(command=run_make_demo_data)
    demo.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR)
    demo.add_argument("--per-class", type=int, default=250)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="write even if the folder already holds images")

    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command '{argv[0]}': choose from {', '.join(COMMANDS)}")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]  # `python engine.py [train options]` trains
    args = parser.parse_args(argv)
    return args


def setup_logging() -> None:
    """Progress lines to stdout, warnings to stderr, both as bare messages.

    OpenCV's own warnings about undecodable files are silenced: each such file is named in our warning.
    So are the ONNX exporter's notes on each of its passes: export says what it checked and wrote.
    A file name that is not valid UTF-8 goes to stdout byte for byte, as the disk has it (predictions are
    read by scripts); stderr shows it escaped (as \\udcXX), Python's default for the real stderr.
    """
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if isinstance(stream, io.TextIOWrapper):  # not when something else took it over (a notebook)
            stream.reconfigure(errors=errors)
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[to_stdout, to_stderr], force=True)
    for talkative in ("onnxscript", "onnx_ir"):
        logging.getLogger(talkative).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        return args.command(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory: lower --img-size or --batch-size, or use --device cpu",
              file=sys.stderr)
        return 2
    except OSError as error:  # a folder we may not read or write, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: output files are replaced whole at the end of a run, never half-written; "
              "those not yet replaced are the previous run's", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
