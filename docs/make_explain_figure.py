"""Draw a Grad-CAM figure: a few images of a folder, each above its heatmap, titled with the top classes.

    python docs/make_explain_figure.py MODEL FOLDER [--count 6] [--out docs/explain_heatmaps.png]

It trains nothing: MODEL is a trained model.pt (python engine.py writes output/model.pt), FOLDER any folder of
images (searched recursively; the first --count that decode, in file order, or spread over its class
sub-folders when it has them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MLPipeline.extras.Common import UserError  # noqa: E402
from MLPipeline.CreateDataset import BadImageError  # noqa: E402
from MLPipeline.extras.Files import list_images, read_image
from MLPipeline.extras.Explain import explain, overlay, title_of, torch_network  # noqa: E402
from MLPipeline.extras.Predict import load_model  # noqa: E402
from MLPipeline.extras.Report import save_figure  # noqa: E402


def demo_paths(folder: Path, count: int) -> list[Path]:
    """Round-robin over the top-level sub-folders (one class after another), so that every class shows."""
    paths = list_images(folder)
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(path.relative_to(folder).parts[0], []).append(path)
    ordered = [group[i] for i in range(max(map(len, groups.values()), default=0))
               for group in groups.values() if i < len(group)]
    return ordered[:count * 3]  # spares for files that do not decode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a trained model.pt (not .onnx: it has no gradients)")
    parser.add_argument("folder", type=Path, help="images to explain")
    parser.add_argument("--count", type=int, default=6, help="how many images (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "explain_heatmaps.png")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, args.device)
        torch_network(model)
        shown = []
        for path in demo_paths(args.folder, args.count):
            try:
                image = read_image(path)
            except (BadImageError, OSError) as error:
                print(f"skipped {path}: {error}", file=sys.stderr)
                continue
            heatmap, probabilities = explain(model, image)
            shown.append((path, image, heatmap, probabilities))
            if len(shown) == args.count:
                break
        if not shown:
            raise UserError(f"no image in {args.folder} could be decoded")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    figure = Figure(figsize=(2.6 * len(shown), 5.6))
    for column, (path, image, heatmap, probabilities) in enumerate(shown):
        top, bottom = figure.add_subplot(2, len(shown), column + 1), figure.add_subplot(2, len(shown),
                                                                                          len(shown) + column + 1)
        top.imshow(image)
        top.set_title(f"{path.parent.name}/{path.name}"[:28], fontsize=7)
        bottom.imshow(overlay(image, heatmap))
        bottom.set_title(title_of(probabilities, top_k=2).replace(", ", "\n"), fontsize=7)
        top.axis("off")
        bottom.axis("off")
    figure.suptitle(f"Grad-CAM of the predicted class ({model.info['arch']}, last conv stage)", fontsize=9)
    save_figure(figure, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
