"""Build docs/demo_samples.png: a contact sheet of the synthetic demo data, one row per class.

    python docs/make_demo_samples.py [--per-class 6] [--seed 1] [--out docs/demo_samples.png]

The sheet shows the first images of a fresh run. Its seed is 1, not the dataset's default 0,
because seed 0's first six "others" happen to be mostly forms and plain scenes, while seed 1's
show the card-like hard negatives (ID and business cards) that make the task non-trivial.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MLPipeline.extras.SyntheticData import CLASS_NAMES, make_demo_data  # noqa: E402

THUMB_HEIGHT = 170
GAP = 8
LABEL_HEIGHT = 30


def contact_sheet(data_dir: Path, per_class: int) -> Image.Image:
    """One labelled row of thumbnails per class, in file order."""
    rows = []
    for class_name in CLASS_NAMES:
        paths = sorted((data_dir / class_name).glob("*.jpg"))[:per_class]
        thumbs = []
        for path in paths:
            with Image.open(path) as image:
                width = round(image.width * THUMB_HEIGHT / image.height)
                thumbs.append(image.convert("RGB").resize((width, THUMB_HEIGHT), Image.Resampling.LANCZOS))
        rows.append((class_name, thumbs))
    sheet_width = GAP + max(sum(thumb.width + GAP for thumb in thumbs) for _, thumbs in rows)
    sheet = Image.new("RGB", (sheet_width, len(rows) * (LABEL_HEIGHT + THUMB_HEIGHT + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=20)
    y = GAP
    for class_name, thumbs in rows:
        draw.text((GAP, y + 4), class_name, fill="black", font=font)
        x, y = GAP, y + LABEL_HEIGHT
        for thumb in thumbs:
            sheet.paste(thumb, (x, y))
            x += thumb.width + GAP
        y += THUMB_HEIGHT + GAP
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo_samples.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        make_demo_data(data_dir, per_class=args.per_class, seed=args.seed)
        contact_sheet(Path(data_dir), args.per_class).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
