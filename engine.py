"""Command line: train (the default), predict, evaluate, export, make-demo-data.

    python engine.py                      # train with the original's settings on Data/
    python engine.py predict photo.jpg    # classify images with output/model.pt
    python engine.py export               # output/model.onnx, for ONNX Runtime in any language
    python engine.py --help               # every command and option
"""
from __future__ import annotations

import os
import signal
import sys


def stop_while_loading(number: int, frame) -> None:
    """A Ctrl-C (or SIGTERM) while the libraries load, the first seconds: nothing is written yet, so stop at once."""
    os.write(2, b"interrupted: nothing was written\n")
    os._exit(128 + number)


if __name__ == "__main__":  # main() installs the handler of the run itself
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop_while_loading)

import argparse  # noqa: E402 (after the handler above)
import io  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from MLPipeline.Train import train  # noqa: E402 (the recipe)
from MLPipeline.extras import Run  # noqa: E402, I001 (the machinery around it)
from MLPipeline.extras.Files import MAX_PIXELS
from MLPipeline.extras.OutputFolder import printable, worker_handover_failed
from MLPipeline.extras.Common import STOP_REQUESTED, Terminated, request_stop, stop_if_asked
from MLPipeline.extras.Run import RunConfig, UserError, check_option
from MLPipeline.extras.Weights import BACKBONES

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "Data"
DEFAULT_OUTPUT_DIR = HERE / "output"
DEFAULT_MODEL = DEFAULT_OUTPUT_DIR / "model.pt"
EXPORT_FORMATS = ("onnx", "pt2")




def setup_logging() -> None:
    """Every log line (progress, warnings) to stderr, bare; stdout is left to what a command prints for
    scripts to read (predictions). A file name that is not valid UTF-8 goes to stdout byte for byte, as the
    disk has it; stderr shows it escaped (as \\udcXX), Python's default for the real stderr."""
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if isinstance(stream, io.TextIOWrapper):  # not when something else took it over (a notebook)
            stream.reconfigure(errors=errors)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    for talkative in ("onnxscript", "onnx_ir"):  # the ONNX exporter's notes on each of its passes
        logging.getLogger(talkative).setLevel(logging.WARNING)


def train_config(args: argparse.Namespace) -> RunConfig:
    """The training run's settings from the command line, checked as they are made; on a fresh clone's empty
    Data/ the demo dataset is written first."""
    options = dict(vars(args), data_dir=args.data_dir or DEFAULT_DATA_DIR)
    del options["command"], options["command_name"]
    config = RunConfig(**options)
    if args.data_dir is None and holds_nothing_but_readme(config.data_dir):
        from MLPipeline.extras.SyntheticData import make_demo_data  # only a fresh clone's first run needs it
        logging.info("%s holds no images: generating the demo dataset there first "
                     "(python engine.py make-demo-data; put your own images there instead to train on them)",
                     config.data_dir)
        make_demo_data(config.data_dir)
    return config


def holds_nothing_but_readme(folder: Path) -> bool:
    """The untouched Data/ of a fresh clone: demo data may go there without mixing with anyone's files."""
    return not folder.exists() or all(path.name == "README.md" or path.name.startswith(".")
                                      for path in folder.iterdir())


def run_predict(args: argparse.Namespace) -> int:
    import MLPipeline.extras.Report as Report
    from MLPipeline.extras.Distributed import is_main_process
    from MLPipeline.extras.Explain import explain_paths, torch_network
    from MLPipeline.extras.Predict import load_model, predict
    check_predict_targets(args)
    check_option("max_pixels", args.max_pixels)
    check_option("workers", args.workers)
    min_confidence = checked_min_confidence(args.min_confidence)
    model = load_model(args.model, args.device)
    if args.explain:
        torch_network(model)  # an .onnx model cannot explain: say so before classifying anything
    results = predict(model, args.paths, max_pixels=args.max_pixels, workers=args.workers,
                      min_confidence=min_confidence, review=args.review)
    if results.empty:
        raise UserError(f"no image files found in {', '.join(map(str, args.paths))}")
    if not is_main_process():  # under torchrun every process has the whole table; rank 0 reports it
        return 2 if (results.error != "").any() else 0
    if args.csv:  # before the console lines: a reader that stops early (| head) must not cost the file
        Report.write_csv(Path(args.csv), results)
    for _, row in results[results.error == ""].iterrows():  # the failed ones were named as they were skipped
        ranked = sorted(model.classes, key=lambda name: -row[f"p_{name}"])[:args.top_k]
        decision = f"{row['decision']}{f' ({row.reason})' if row.reason else ''}\t" if "reason" in row else ""
        print(f"{row['input']}\t{decision}" + "\t".join(f"{name} {row[f'p_{name}']:.3f}" for name in ranked))
    if "reason" in results and (results.error == "").any():  # a review is an answer: the exit status stays 0
        print(review_line(results.reason[results.error == ""], min_confidence))
    if args.explain:
        written = explain_paths(model, results.input[results.error == ""].tolist(), args.explain,
                                max_pixels=args.max_pixels)
        print(f"explanations: {len(written)} image(s) in {args.explain}")
    failed = (results.error != "").sum()
    if failed:
        print(f"error: {failed} of {len(results)} input(s) could not be classified (named above)", file=sys.stderr)
        return 2
    return 0


def review_line(reasons, min_confidence: float | None) -> str:
    """The summary of predict's review: how many images went there, and why."""
    low = "" if min_confidence is None else (f", {reasons.str.contains('low confidence').sum()} below confidence "
                                             f"{min_confidence:g}")
    return (f"review: {(reasons != '').sum()} of {len(reasons)} image(s) "
            f"({reasons.str.contains('unfamiliar').sum()} unfamiliar{low})")


def checked_min_confidence(value: float | None) -> float | None:
    from MLPipeline.extras.Calibration import check_probability
    return None if value is None else check_probability(value, "--min-confidence")


def check_predict_targets(args: argparse.Namespace) -> None:
    """--csv and --explain, before any work: neither may be an input (the model, an image), lie in a folder
    predict reads, nor replace an image of the user's."""
    from MLPipeline.extras.Explain import EXPLANATION_NAMES
    from MLPipeline.extras.OutputFolder import check_write_target
    folders = [path for path in args.paths if os.path.isdir(path)]
    for flag, target, folder in (("--csv", args.csv, False), ("--explain", args.explain, True)):
        if target:
            check_write_target(target, flag, folder=folder, inputs=[args.model, *args.paths], data_dirs=folders,
                               writes=EXPLANATION_NAMES if folder else "")


def run_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from MLPipeline.extras.Calibration import coverage_lines
    from MLPipeline.extras.Distributed import is_main_process
    from MLPipeline.extras.Explain import torch_network
    from MLPipeline.extras.Predict import evaluate, load_model
    check_option("max_pixels", args.max_pixels)
    check_option("workers", args.workers)
    if args.explain_count < 0:
        raise UserError(f"--explain-count must be 0 or more, not {args.explain_count}")
    min_confidence = checked_min_confidence(args.min_confidence)
    model = load_model(args.model, args.device)
    if args.explain_count:
        torch_network(model)  # an .onnx model cannot explain: say so before scoring anything
    report = evaluate(model, args.data_dir, args.output_dir, args.max_pixels, workers=args.workers,
                      explain_count=args.explain_count, min_confidence=min_confidence, review=args.review)
    if not is_main_process():
        return 0
    print(f"accuracy {100 * report['accuracy']:.2f}% on {report['images']} images "
          f"(model backbone {'pretrained' if model.info['pretrained'] else 'NOT pretrained'})")
    print(pd.DataFrame(report["per_class"]).to_string(index=False, float_format="%.3f"))
    print(f"expected calibration error {100 * report['expected_calibration_error']:.2f}% (temperature "
          f"{report['temperature']:.3g}); kept at each confidence threshold:")
    print("\n".join(coverage_lines(pd.DataFrame(report["coverage"]), report["images"])))
    if "review" in report:
        review, rest = report["review"], report["review"]["accuracy_on_the_rest"]
        print(f"review: {review['images']} of {report['images']} image(s) ({review['unfamiliar']} unfamiliar, "
              f"{review['low_confidence']} low confidence); {review['decided']} decided "
              f"({100 * review['coverage']:.1f}%)" + ("" if rest is None else f", {100 * rest:.2f}% of them right"))
    print(f"outputs in {args.output_dir}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from MLPipeline.extras.Export import export_model
    out = export_model(args.model, args.format, args.out)
    print(f"wrote {out}: uint8 RGB images in, logits out; classes, image size and normalisation in its metadata "
          f"(README: Export and deploy)")
    return 0


def run_make_demo_data(args: argparse.Namespace) -> int:
    from MLPipeline.extras.SyntheticData import make_demo_data
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


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Every training flag, in one place (as torchvision's get_args_parser): the recipe's settings first,
    then the tool's options, each off by default. RunConfig checks the values once."""
    add = parser.add_argument
    add("--data-dir", type=Path, help="one sub-folder per class, or a pre-split pair (train/+test/, train/+val/, "
        "Training_data/+Testing_Data/) (default: Data/ next to engine.py; demo data when it is empty)")
    add("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where model.pt, metrics and plots go "
        "(default: output/ next to engine.py)")
    add("--epochs", type=int, default=10, help="passes over the training images (default: %(default)s)")
    add("--batch-size", type=int, default=8, help="training batch size (default: %(default)s)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate of the head (default: %(default)s)")
    add("--img-size", type=int, default=200, help="images are resized to this many pixels a side "
        "(default: %(default)s)")
    add("--test-size", type=float, default=0.2, help="test fraction of each class (default: %(default)s)")
    add("--seed", type=int, default=42, help="seed of the split, the head's first weights and the batches' "
        "order (default: %(default)s)")
    add("--backbone", default="resnet50", help="network whose ImageNet features the head learns from: "
        f"{', '.join(BACKBONES)} (default: %(default)s)")
    add("--weights", default="auto", help="auto (the backbone's ImageNet weights; offline, the pip-installed "
        "ImageNet EfficientNet-Lite0 instead, with a warning) | imagenet (the backbone's own, or an error) | "
        "none (random init) | PATH to a state dict (default: %(default)s)")
    add("--device", default="auto", help="auto (the GPU when PyTorch sees one) | cpu | cuda")
    add("--precision", default="auto", help="auto: the frozen backbone in bfloat16 where the hardware computes it "
        "natively (CUDA, CPUs with AVX-512 BF16 or AMX), else fp32 | fp32: always (default: %(default)s)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes that decode images while "
        "the network runs (0: the main process) (default: %(default)s)")
    tool = parser.add_argument_group("the tool's options (all off by default)")
    tool.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="images with more pixels are skipped, "
                      "unread (a safe limit on memory); raise it for big scans (default: %(default)s)")
    tool.add_argument("--dedupe", action="store_true", help="skip a test (or val) file with the same bytes as a "
                      "training file (it is always reported)")
    tool.add_argument("--cache-dir", type=Path, help="keep the frozen backbone's features in this folder: a "
                      "second run with other head settings reads no image")
    tool.add_argument("--val-size", type=float, default=0.0, help="carve this fraction of each class's training "
                      "images out as a validation set: keep the epoch with the lowest validation loss and "
                      "calibrate the probabilities on it (default: %(default)s)")
    tool.add_argument("--folds", type=int, default=0, help="K-fold cross-validation of the head over the "
                      "training images, then the final model as without it (default: %(default)s)")
    tool.add_argument("--class-weights", default="none", help="balanced: weigh each class's loss inversely to "
                      "its share of the training images (default: %(default)s)")
    tool.add_argument("--schedule", default="none", help="cosine: anneal the learning rate to 0 over the epochs")
    tool.add_argument("--augment", action="store_true", help="random crops, small rotations, perspective and "
                      "colour jitter on training images (the network then reads the images every epoch)")
    tool.add_argument("--flips", action="store_true", help="with --augment, also mirror images")
    tool.add_argument("--unfreeze", default="none", help="also train the backbone's last stage (last: layer4 on "
                      "ResNets) or all of it (default: %(default)s)")
    tool.add_argument("--backbone-lr", type=float, help="learning rate of unfrozen backbone layers (default: "
                      "--lr / 10)")
    tool.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", help="the whole network "
                      "reads the images every epoch, like the original (same results, much slower)")
    tool.add_argument("--backbone-runtime", default="pytorch", help="pytorch | onnxruntime | auto (the faster "
                      "of the two on the first batch) (default: %(default)s)")
    tool.add_argument("--inference-batch-size", type=int, help="batch size of feature extraction and scoring "
                      "(default: 64 on a GPU, 16 at 200 px on the CPU)")
    tool.add_argument("--unfamiliar-share", type=float, default=0.05, help="share of familiar held-out images "
                      "(the validation split, else out-of-fold training images) that the unfamiliar-input "
                      "threshold sends to review (default: %(default)s)")


def add_review_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-review", dest="review", action="store_false", help="do not send images unlike the "
                        "training images to review (by default they get the decision 'review', reason unfamiliar)")


def add_max_pixels_and_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="images with more pixels are skipped")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")


def add_predict_options(predictor: argparse.ArgumentParser) -> None:
    predictor.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    predictor.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    predictor.add_argument("--csv", type=Path, help="also write every class probability per image here")
    predictor.add_argument("--top-k", type=positive_int, default=1, help="how many classes to print per image")
    predictor.add_argument("--min-confidence", type=float, metavar="P", help="a prediction whose probability is "
                           "below P also gets the decision 'review' (reason: low confidence; exit status still 0)")
    add_review_option(predictor)
    predictor.add_argument("--explain", type=Path, metavar="DIR", help="also write a Grad-CAM heatmap picture of "
                           "each classified image to DIR (needs model.pt: an .onnx file has no gradients)")
    add_device_option(predictor)
    add_max_pixels_and_workers(predictor)


def add_evaluate_options(evaluator: argparse.ArgumentParser) -> None:
    evaluator.add_argument("data_dir", type=Path, help="folder with one sub-folder per class")
    evaluator.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    evaluator.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR / "evaluation")
    evaluator.add_argument("--min-confidence", type=float, metavar="P", help="also send the images whose "
                           "probability is below P to review")
    add_review_option(evaluator)
    evaluator.add_argument("--explain-count", type=int, default=0, metavar="N", help="explained/ in the output "
                           "folder also shows the N least confident correct images (default: %(default)s)")
    add_device_option(evaluator)
    add_max_pixels_and_workers(evaluator)


def add_export_options(exporter: argparse.ArgumentParser) -> None:
    exporter.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    exporter.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                          help="onnx (default; ONNX Runtime, any language) or pt2 (torch.export.load)")
    exporter.add_argument("--out", type=Path, help="file to write (default: next to --model, with the format's "
                          "suffix)")


def add_demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR)
    demo.add_argument("--per-class", type=int, default=250)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="write even if the folder already holds images")


# name: (help, what runs it, what adds its options)
COMMANDS = {"train": ("train and save output/model.pt (the default command)", None, add_train_options),
            "predict": ("classify image files or folders with a trained model", run_predict, add_predict_options),
            "evaluate": ("score a trained model on a labelled folder", run_evaluate, add_evaluate_options),
            "export": ("write the trained model as ONNX (or torch.export .pt2) for use without this project",
                       run_export, add_export_options),
            "make-demo-data": ("write the synthetic demo dataset of fake documents", run_make_demo_data,
                               add_demo_options)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command and its options; only the command given has its options added (each is a few dozen)."""
    parser = argparse.ArgumentParser(prog="engine.py", description="Transfer-learning document classifier "
                                     "(ResNet50). With no command: train on Data/ with the original's settings.")
    commands = parser.add_subparsers(dest="command_name", metavar="{" + ",".join(COMMANDS) + "}")
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command '{argv[0]}': choose from {', '.join(COMMANDS)}")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]  # `python engine.py [train options]` trains
    for name, (help, run, add_options) in COMMANDS.items():
        command = commands.add_parser(name, help=help)
        command.set_defaults(command=run)
        if name == argv[0]:
            add_options(command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    STOP_REQUESTED.clear()
    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    # A Ctrl-C is recorded by the handler, and raised at the next module call (each batch) in the loop's own code.
    stops = torch.nn.modules.module.register_module_forward_pre_hook(stop_if_asked)
    try:
        if args.command_name == "train":
            config = train_config(args)
            with Run.checked_output(config):  # the folders it writes checked, the output folder locked
                if config.is_the_recipe():  # the recipe, MLPipeline/Train.py
                    run = train(config, **Run.recipe_pieces(config))
                    Run.write_reports(run, config.output_dir)
                else:  # an option, or torchrun: the recipe's pieces with the machinery they need
                    from MLPipeline.extras.Pipeline import train_with_options
                    train_with_options(config)
            status = 0
        else:
            status = args.command(args)
        stop_if_asked()  # a Ctrl-C after the last batch: the outputs are all written, and the exit still says so
        return status
    except UserError as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory: lower --img-size or --batch-size, or use --device cpu",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output stopped early (| head): not an error of this run
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # a folder we may not read or write, a full disk
        mine = error.filename is None and isinstance(error.strerror, str)  # ours name the file in their text
        print(f"error: {printable(error.strerror if mine else str(error))}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a decoding worker that could not hand over its batch (shared memory)
        if not worker_handover_failed(error):
            raise
        print(f"error: {printable(worker_handover_failed(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"{'terminated' if isinstance(interrupt, Terminated) else 'interrupted'}: output files are replaced "
              "whole at the end of a run, never half-written; those not yet replaced are the previous run's",
              file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    finally:
        stops.remove()
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    status = main()
    for number in (signal.SIGINT, signal.SIGTERM):  # the run is over: a late Ctrl-C cannot cut its exit short
        signal.signal(number, signal.SIG_IGN)
    sys.exit(status)
