"""Fake-but-realistic demo documents: driving licences, social security cards and others.

Each image is a document drawn with Pillow and then "photographed" with OpenCV: laid on a
surface, framed, tilted, warped, unevenly lit, blurred, noised and JPEG-compressed. All
personal data is invented and obviously fake (SSNs only from never-issued areas, licence
numbers of a made-up format, names from a short list); no real issuer's artwork is copied.
Image i of a class depends only on (seed, class, i), so runs are byte-for-byte repeatable
and a smaller run is a prefix of a larger one.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from MLPipeline.extras.Common import UserError, stop_if_asked
from MLPipeline.extras.Files import list_images
from MLPipeline.extras.OutputFolder import check_write_target, own_folder, shown

CLASS_NAMES = ("driving_license", "social_security", "others")

RGB = tuple[int, int, int]
T = TypeVar("T")

INK: RGB = (24, 24, 32)
BLUE_PEN: RGB = (20, 30, 120)
WHITE: RGB = (255, 255, 255)
GREY: RGB = (128, 128, 128)
SSN_BLUE: RGB = (150, 190, 232)
FIRST_NAMES = ("ALEX", "JORDAN", "CASEY", "MORGAN", "RILEY", "TAYLOR", "JAMIE", "AVERY", "ROBIN", "DANA", "QUINN")
LAST_NAMES = ("SAMPLE", "SPECIMEN", "EXAMPLE", "RIVERS", "HOLLOWAY", "QUILL", "FENWICK", "ASHDOWN", "BRAMBLE")
STREETS = ("MAPLE", "OAK", "CEDAR", "HARBOR", "MILL", "SUMMIT", "WILLOW", "BIRCH")
CITIES = ("NORTHWIND CITY", "LAKEVALE", "PINEHOLM", "EASTMERE", "CALDORA SPRINGS", "LOWMARSH")
WORDS = ("the", "account", "please", "meeting", "schedule", "review", "our", "will", "office", "number", "we",
         "attached", "your", "request", "date", "and", "project", "for", "team", "thank", "you", "in", "payment",
         "report", "to", "following", "update", "of", "service", "notice", "with", "next", "week", "a", "policy")
RECEIPT_ITEMS = ("COFFEE", "BAGEL", "MILK 1L", "BREAD", "APPLES", "PASTA", "BATTERIES", "NOTEBOOK", "TEA", "SOAP")
SKIN_TONES: tuple[RGB, ...] = ((241, 205, 180), (224, 172, 140), (198, 134, 96), (141, 85, 54), (95, 60, 40))
HAIR_COLOURS: tuple[RGB, ...] = ((30, 25, 20), (70, 45, 25), (120, 80, 40), (200, 170, 110), (150, 150, 150))
DESK_COLOURS: tuple[RGB, ...] = ((122, 84, 50), (160, 116, 74), (88, 60, 40), (62, 62, 66), (200, 198, 190),
                                 (236, 234, 228), (34, 34, 38), (52, 72, 112), (70, 96, 70))
SCENE_FRACTION = 0.15  # share of "others" that are pictures with no document at all


@dataclass(frozen=True)
class LicenseTemplate:
    """One invented issuer's licence design."""
    issuer: str
    number_prefix: str
    title: str
    band: RGB
    card: RGB
    label: RGB
    layout: str  # "band", "band_footer" (top and bottom), "stripe" (down the portrait's side), "ruled"
    portrait_left: bool


LICENSE_TEMPLATES = (
    LicenseTemplate("STATE OF NORTHWIND", "NW", "DRIVER LICENSE",
                    (24, 48, 112), (228, 235, 245), (176, 30, 36), "band", True),
    LicenseTemplate("REPUBLIC OF CALDORA", "CD", "DRIVER'S LICENSE",
                    (128, 24, 44), (244, 237, 222), (128, 24, 44), "band_footer", False),
    LicenseTemplate("COMMONWEALTH OF ESTMERE", "EM", "DRIVING LICENCE",
                    (30, 112, 72), (229, 241, 231), (30, 90, 60), "stripe", True),
    LicenseTemplate("PROVINCE OF LOWMARSH", "LM", "DRIVER LICENSE",
                    (0, 108, 128), (236, 237, 243), (168, 40, 40), "ruled", False),
    LicenseTemplate("FREE STATE OF VANTARA", "VT", "DRIVER LICENSE",
                    (196, 136, 22), (246, 243, 233), (40, 40, 120), "band", False),
    LicenseTemplate("TERRITORY OF KESTREL BAY", "KB", "DRIVER LICENSE",
                    (90, 40, 120), (240, 236, 246), (90, 40, 120), "stripe", False),
)
OTHER_ID_KINDS = (  # title, organisations, (detail label, detail values)
    ("EMPLOYEE ID", ("NORTHWIND TECHNOLOGIES", "HARBOR HEALTH", "PINEHOLM LOGISTICS"),
     ("DEPT", ("ENGINEERING", "SALES", "NURSING"))),
    ("STUDENT ID", ("LAKEVALE UNIVERSITY", "EASTMERE COLLEGE"), ("PROGRAM", ("BIOLOGY", "HISTORY", "DESIGN"))),
    ("LIBRARY CARD", ("PINEHOLM PUBLIC LIBRARY", "CALDORA CITY LIBRARY"), ("BRANCH", ("CENTRAL", "RIVERSIDE"))),
)


# --- random values ---------------------------------------------------------------------------

def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One element of `options` (rng.choice would turn a tuple of tuples into an array)."""
    return options[int(rng.integers(len(options)))]


def random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> RGB:
    return tuple(int(value) for value in rng.integers(low, high, 3))


def mix(colour: RGB, other: RGB, amount: float) -> RGB:
    """`colour` moved `amount` of the way towards `other`."""
    return tuple(round(a + (b - a) * amount) for a, b in zip(colour, other))


def fake_name(rng: np.random.Generator) -> tuple[str, str]:
    return pick(rng, FIRST_NAMES), pick(rng, LAST_NAMES)


def fake_date(rng: np.random.Generator, first_year: int, last_year: int) -> tuple[int, int, int]:
    """(month, day, year); days stop at 28 so every month is valid."""
    return int(rng.integers(1, 13)), int(rng.integers(1, 29)), int(rng.integers(first_year, last_year + 1))


def us_date(date: tuple[int, int, int]) -> str:
    month, day, year = date
    return f"{month:02d}/{day:02d}/{year}"


def fake_address(rng: np.random.Generator) -> tuple[str, str]:
    street = f"{rng.integers(10, 9999)} {pick(rng, STREETS)} {pick(rng, ('ST', 'AVE', 'RD', 'LN'))}"
    return street, f"{pick(rng, CITIES)} 000{rng.integers(10, 100)}"  # no ZIP code starts with 000


def fake_ssn(rng: np.random.Generator) -> str:
    """A social security number from areas that are never issued: 000 or 900-999."""
    area = 0 if rng.random() < 0.25 else int(rng.integers(900, 1000))
    return f"{area:03d}-{rng.integers(1, 100):02d}-{rng.integers(1, 10000):04d}"


def fake_license_number(rng: np.random.Generator, prefix: str) -> str:
    """An invented format, no real issuer's: prefix, seven digits, a letter."""
    return f"{prefix}-{rng.integers(0, 10**7):07d}-{chr(65 + int(rng.integers(26)))}"


# --- drawing helpers -------------------------------------------------------------------------

@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (works offline); cached because loading parses the font."""
    return ImageFont.load_default(size=size)


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int,
              fill: RGB = INK, bold: bool = False, anchor: str = "la") -> None:
    # The bundled font has no bold face; a thin outline in the text's own colour stands in for one.
    draw.text(xy, text, fill=fill, font=font(int(size)), anchor=anchor,
              stroke_width=0.6 if bold else 0, stroke_fill=fill)


def draw_field(draw: ImageDraw.ImageDraw, xy: tuple[int, int], label: str, value: str, size: int,
               label_fill: RGB, value_fill: RGB = INK) -> None:
    """A small label with its value underneath, as on ID cards."""
    x, y = xy
    draw_text(draw, (x, y), label, max(9, size * 3 // 5), label_fill)
    draw_text(draw, (x, y + size * 3 // 4), value, size, value_fill, bold=True)


def linear_gradient(width: int, height: int, start: RGB, end: RGB, angle: float) -> np.ndarray:
    """Float RGB image blending `start` into `end` along the direction `angle` (radians)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    along = x * np.cos(angle) + y * np.sin(angle)
    along = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    return np.float32(start) + along[..., None] * (np.float32(end) - np.float32(start))


def smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Random values on a grid about `cells` across, smoothly interpolated up to width x height."""
    grid = rng.standard_normal((max(2, cells * height // width), max(2, cells))).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def blank_document(rng: np.random.Generator, width: int, height: int, paper: RGB,
                   pattern_ink: RGB | None = None) -> Image.Image:
    """Plain paper, or paper printed with fine interfering wavy lines (guilloche) in `pattern_ink`."""
    if pattern_ink is None:
        return Image.new("RGB", (width, height), paper)
    y, x = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)
    spacing = rng.uniform(5, 8)
    strength = np.zeros((height, width), np.float32)
    for sign in (1, -1):  # two families of waves crossing each other
        period, amplitude, phase = rng.uniform(40, 90), rng.uniform(6, 14), rng.uniform(0, 2 * np.pi)
        rows = (y + sign * amplitude * np.sin(x / period * 2 * np.pi + phase)) / spacing  # a wave per column
        distance = np.abs(rows - np.round(rows)) * spacing  # pixels to the nearest line's centre
        strength = np.maximum(strength, np.clip(1.2 - distance, 0, 1))
    image = np.float32(paper) + strength[..., None] * (np.float32(pattern_ink) - np.float32(paper))
    return Image.fromarray(image.astype(np.uint8))


def with_rounded_corners(image: Image.Image, radius: int) -> Image.Image:
    """RGBA copy whose alpha cuts the corners off, so the desk shows through them."""
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, image.width - 1, image.height - 1), radius, fill=255)
    rounded = image.convert("RGBA")
    rounded.putalpha(mask)
    return rounded


def draw_portrait(card: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator,
                  ghost: bool = False) -> None:
    """A drawn head-and-shoulders photo in `box`; `ghost` prints it faint and grey, a security feature."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    photo = Image.new("RGB", (width, height), mix(random_colour(rng, 150, 256), (200, 215, 235), 0.5))
    draw = ImageDraw.Draw(photo)
    skin, hair = pick(rng, SKIN_TONES), pick(rng, HAIR_COLOURS)
    cx = width * rng.uniform(0.45, 0.55)
    head_w = width * rng.uniform(0.38, 0.48)
    head_h, top = head_w * rng.uniform(1.2, 1.35), height * rng.uniform(0.1, 0.18)
    draw.ellipse((cx - width * 0.55, height * 0.74, cx + width * 0.55, height * 1.5), fill=random_colour(rng, 0, 200))
    draw.rectangle((cx - head_w * 0.2, top + head_h * 0.7, cx + head_w * 0.2, height * 0.8), fill=mix(skin, INK, 0.15))
    hair_length = rng.uniform(0.55, 1.1)  # short hair ends at the ears, long hair at the shoulders
    draw.ellipse((cx - head_w * 0.58, top - head_h * 0.08, cx + head_w * 0.58, top + head_h * hair_length), fill=hair)
    draw.ellipse((cx - head_w / 2, top, cx + head_w / 2, top + head_h), fill=skin)
    draw.chord((cx - head_w * 0.52, top - head_h * 0.06, cx + head_w * 0.52, top + head_h * 0.45), 180, 360, fill=hair)
    eye_y, eye_r = top + head_h * 0.5, max(1.5, head_w * 0.045)
    for eye_x in (cx - head_w * 0.19, cx + head_w * 0.19):
        draw.ellipse((eye_x - eye_r, eye_y - eye_r, eye_x + eye_r, eye_y + eye_r), fill=INK)
    draw.line((cx, eye_y + head_h * 0.08, cx - head_w * 0.04, eye_y + head_h * 0.18), fill=mix(skin, INK, 0.4), width=2)
    draw.arc((cx - head_w * 0.16, top + head_h * 0.64, cx + head_w * 0.16, top + head_h * 0.8), 20, 160,
             fill=(150, 60, 60), width=2)
    if ghost:
        photo = Image.blend(card.crop(box), photo.convert("L").convert("RGB"), 0.3)
    card.paste(photo, (x0, y0))


def draw_scribble(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], rng: np.random.Generator,
                  fill: RGB, width: int = 2) -> None:
    """A looping pen stroke across `box`: a signature, or one handwritten word."""
    x0, y0, x1, y1 = box
    box_height = max(y1 - y0, 1)
    letters = max(2, int((x1 - x0) / box_height * rng.uniform(1.2, 2.2)))
    t = np.linspace(0, letters, letters * 12)
    # Uneven letter widths and heights, some tall like l or k, so it reads as writing and not as a spring.
    letter_edges = np.concatenate([[0], np.cumsum(rng.uniform(0.5, 1.5, letters))])
    advance = np.interp(t, np.arange(letters + 1), letter_edges / letter_edges[-1])
    tall = rng.random(letters + 1) < 0.3
    heights = np.where(tall, rng.uniform(0.32, 0.42, letters + 1), rng.uniform(0.12, 0.22, letters + 1))
    loop = np.interp(t, np.arange(letters + 1), heights) * box_height
    turn = 2 * np.pi * t + rng.uniform(0, 2 * np.pi)
    x = x0 + (x1 - x0) * 0.85 * advance + loop * rng.uniform(0.2, 0.6) * (1 + np.cos(turn))
    y = y1 - box_height * 0.15 - loop * (1 + np.sin(turn))
    draw.line(list(zip(x.tolist(), y.tolist())), fill=fill, width=width, joint="curve")


def draw_handwriting(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], line_gap: float,
                     rng: np.random.Generator, fill: RGB) -> None:
    """Rows of scribbled words filling `box`, with ragged line ends."""
    x0, y0, x1, y1 = box
    for baseline in np.arange(y0 + line_gap, y1, line_gap):
        x, line_end = x0, x1 - rng.uniform(0, 0.4) * (x1 - x0)
        while x < line_end:
            word_width = line_gap * rng.uniform(0.8, 3.0)
            draw_scribble(draw, (x, baseline - line_gap * 0.55, min(x + word_width, x1), baseline), rng, fill)
            x += word_width + line_gap * 0.4


def draw_printed_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], width: int, rows: int, size: int,
                       rng: np.random.Generator) -> int:
    """Rows of random words wrapped to `width`; returns the y just below them."""
    x, y = xy
    for _ in range(rows):
        line = pick(rng, WORDS).capitalize()
        while draw.textlength(line, font=font(size)) < width * rng.uniform(0.85, 1.0):
            line += " " + pick(rng, WORDS)
        draw_text(draw, (x, y), line, size)
        y += int(size * 1.5)
    return y


def draw_barcode(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    x = x0
    for bar_width in rng.integers(1, 5, (x1 - x0) // 2).tolist():
        if x + bar_width > x1:
            break
        if rng.random() < 0.5:
            draw.rectangle((x, y0, x + bar_width - 1, y1), fill=INK)
        x += bar_width


def draw_seal(draw: ImageDraw.ImageDraw, centre: tuple[int, int], radius: int, colour: RGB,
              rng: np.random.Generator) -> None:
    """An invented seal of plain geometry: two rings, a ring of dots and a star."""
    cx, cy = centre
    for ring, line_width in ((radius, 3), (radius * 0.78, 1)):
        draw.ellipse((cx - ring, cy - ring, cx + ring, cy + ring), outline=colour, width=line_width)
    for angle in np.linspace(0, 2 * np.pi, 28, endpoint=False):
        dot_x, dot_y = cx + radius * 0.89 * np.cos(angle), cy + radius * 0.89 * np.sin(angle)
        draw.ellipse((dot_x - 2, dot_y - 2, dot_x + 2, dot_y + 2), fill=colour)
    points = int(rng.integers(5, 9))
    angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 2 * points, endpoint=False)
    radii = np.where(np.arange(2 * points) % 2 == 0, radius * 0.62, radius * 0.28)
    star = zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist())
    draw.polygon(list(star), fill=colour)


# --- the documents ---------------------------------------------------------------------------
# Each returns an RGBA image: the alpha is 0 only where a card's rounded corners are cut away.

def draw_driving_license(rng: np.random.Generator) -> Image.Image:
    """An ID-1 card (85.60 x 53.98 mm) in one of the invented issuers' designs."""
    template = pick(rng, LICENSE_TEMPLATES)
    width, height = 640, 404
    pattern = mix(template.card, template.band, 0.25) if rng.random() < 0.6 else None
    card = blank_document(rng, width, height, template.card, pattern)
    draw = ImageDraw.Draw(card)
    margin = 38 if template.layout == "stripe" else 30
    if template.layout in ("band", "band_footer"):
        draw.rectangle((0, 0, width, 68), fill=template.band)
        header_x, anchor, header_fill = width // 2, "mm", WHITE
    else:  # the header stands on the card, aligned to the side opposite the portrait
        header_x, anchor = (width - margin, "rm") if template.portrait_left else (margin, "lm")
        header_fill = template.band
    if template.layout == "band_footer":
        draw.rectangle((0, height - 24, width, height), fill=template.band)
    if template.layout == "stripe":
        stripe_x = 0 if template.portrait_left else width - 18
        draw.rectangle((stripe_x, 0, stripe_x + 18, height), fill=template.band)
    if template.layout == "ruled":
        draw.line((margin, 70, width - margin, 70), fill=template.band, width=3)
    draw_text(draw, (header_x, 20), template.issuer, 17, header_fill, anchor=anchor)
    draw_text(draw, (header_x, 48), template.title, 30, header_fill, bold=True, anchor=anchor)

    portrait_x = margin if template.portrait_left else width - margin - 168
    draw_portrait(card, (portrait_x, 84, portrait_x + 168, 294), rng)
    draw_scribble(draw, (portrait_x + 8, 304, portrait_x + 160, 350), rng, INK)
    x, right = (portrait_x + 196, width - margin) if template.portrait_left else (margin, portrait_x - 28)
    y = 80 + int(rng.integers(-4, 5))
    label = template.label
    first, last = fake_name(rng)
    street, city = fake_address(rng)
    issued = fake_date(rng, 2016, 2024)
    draw_field(draw, (x, y), "DL NO", fake_license_number(rng, template.number_prefix), 22, label, label)
    draw_field(draw, (x, y + 46), "DOB", us_date(fake_date(rng, 1950, 2005)), 17, label)
    draw_field(draw, (x + 150, y + 46), "EXP", us_date((issued[0], issued[1], issued[2] + 8)), 17, label)
    draw_field(draw, (x, y + 86), "ISS", us_date(issued), 15, label)
    draw_field(draw, (x + 150, y + 86), "CLASS", pick(rng, ("C", "D", "A", "B", "M")), 15, label)
    draw_text(draw, (x, y + 124), last, 20, bold=True)
    draw_text(draw, (x, y + 148), first, 20, bold=True)
    draw_text(draw, (x, y + 176), street, 14)
    draw_text(draw, (x, y + 194), city, 14)
    height_ft_in = f"{rng.integers(5, 7)}'-{rng.integers(0, 12):02d}\""
    physical = (("SEX", pick(rng, ("M", "F", "X"))), ("HGT", height_ft_in),
                ("EYES", pick(rng, ("BRN", "BLU", "GRN", "HAZ", "GRY"))))
    for column, (name, value) in enumerate(physical):
        draw_field(draw, (x + column * 76, y + 222), name, value, 15, label)
    if rng.random() < 0.5:
        draw_portrait(card, (right - 72, y + 212, right, y + 300), rng, ghost=True)
    return with_rounded_corners(card, 22)


def draw_social_security_card(rng: np.random.Generator) -> Image.Image:
    """A paper card on light-blue guilloche: seal, header, number, name, signature line; no photo."""
    width, height = 600, 400
    paper = (248, 248, 242)
    blue = mix((28, 58, 138), random_colour(rng), 0.12)
    card = blank_document(rng, width, height, paper, mix(SSN_BLUE, paper, rng.uniform(0, 0.3)))
    draw = ImageDraw.Draw(card)
    draw.rectangle((8, 8, width - 9, height - 9), outline=mix(blue, WHITE, 0.4), width=2)
    draw_seal(draw, (80, 80), 54, blue, rng)
    draw_text(draw, (width // 2 + 45, 64), "SOCIAL SECURITY", 38, blue, bold=True, anchor="mm")
    number_y = int(rng.integers(170, 192))
    draw_text(draw, (width // 2, number_y), fake_ssn(rng), int(rng.integers(36, 44)), bold=True, anchor="mm")
    draw_text(draw, (width // 2, number_y + 48), "THIS NUMBER HAS BEEN ESTABLISHED FOR", 15, blue, anchor="mm")
    first, last = fake_name(rng)
    middle = chr(65 + int(rng.integers(26)))
    draw_text(draw, (width // 2, number_y + 92), f"{first} {middle} {last}", 28, bold=True, anchor="mm")
    line_y = height - 58
    draw.line((110, line_y, width - 110, line_y), fill=INK, width=2)
    draw_text(draw, (width // 2, line_y + 14), "SIGNATURE", 12, blue, anchor="mm")
    if rng.random() < 0.7:
        draw_scribble(draw, (150, line_y - 42, width - 170, line_y - 4), rng, pick(rng, (INK, BLUE_PEN)))
    return with_rounded_corners(card, 6)


def draw_other_id_card(rng: np.random.Generator) -> Image.Image:
    """A hard negative: an employee, student or library card with a photo, in licence-like colours."""
    title, organisations, (detail_label, details) = pick(rng, OTHER_ID_KINDS)
    width, height = 640, 404
    band = pick(rng, LICENSE_TEMPLATES).band if rng.random() < 0.5 else random_colour(rng, 0, 170)
    pattern = pick(rng, (SSN_BLUE, mix(band, WHITE, 0.6))) if rng.random() < 0.4 else None
    card = blank_document(rng, width, height, mix(band, WHITE, 0.9), pattern)
    draw = ImageDraw.Draw(card)
    draw.rectangle((0, 0, width, 64), fill=band)
    draw_text(draw, (24, 32), pick(rng, organisations), 22, WHITE, bold=True, anchor="lm")
    draw_text(draw, (width - 24, 32), title, 18, WHITE, anchor="rm")
    portrait_left = rng.random() < 0.5
    portrait_x = 30 if portrait_left else width - 30 - 150
    draw_portrait(card, (portrait_x, 88, portrait_x + 150, 278), rng)
    x = portrait_x + 180 if portrait_left else 30
    first, last = fake_name(rng)
    draw_text(draw, (x, 92), f"{first} {last}", 26, bold=True)
    draw_field(draw, (x, 140), "ID NO", str(rng.integers(10**5, 10**6)), 18, band)
    draw_field(draw, (x, 186), detail_label, pick(rng, details), 18, band)
    draw_field(draw, (x, 232), "VALID THRU", us_date(fake_date(rng, 2025, 2030)), 18, band)
    if rng.random() < 0.7:
        draw_barcode(draw, (x, 310, x + 260, 370), rng)
    else:
        draw_scribble(draw, (x, 310, x + 220, 360), rng, INK)
    return with_rounded_corners(card, 22)


def draw_bank_card(rng: np.random.Generator) -> Image.Image:
    """A hard negative: an ID-1 bank-style card with a chip, an invented bank and a made-up number."""
    width, height = 640, 404
    start, end = random_colour(rng), random_colour(rng)
    card = Image.fromarray(linear_gradient(width, height, start, end, rng.uniform(0, np.pi)).astype(np.uint8))
    draw = ImageDraw.Draw(card)
    text_fill = WHITE if sum(start) + sum(end) < 760 else INK
    bank = pick(rng, ("NORTHWIND BANK", "CALDORA CREDIT UNION", "LAKEVALE SAVINGS"))
    draw_text(draw, (44, 40), bank, 28, text_fill, bold=True)
    chip_line = (150, 120, 60)
    draw.rounded_rectangle((70, 140, 160, 206), 10, fill=(212, 175, 90), outline=chip_line, width=2)
    draw.line((70, 173, 160, 173), fill=chip_line, width=2)
    draw.line((115, 140, 115, 206), fill=chip_line, width=2)
    # Starting with 0 keeps it clear of every real card network's numbers.
    number = f"0{rng.integers(0, 1000):03d} " + " ".join(f"{rng.integers(0, 10000):04d}" for _ in range(3))
    draw_text(draw, (60, 240), number, 38, text_fill, bold=True)
    expiry = f"{rng.integers(1, 13):02d}/{rng.integers(26, 32)}"
    draw_field(draw, (330, 294), "VALID THRU", expiry, 18, text_fill, text_fill)
    first, last = fake_name(rng)
    draw_text(draw, (60, 350), f"{first} {last}", 22, text_fill)
    draw.regular_polygon((560, 330, 36), int(rng.integers(3, 7)), fill=random_colour(rng))
    return with_rounded_corners(card, 24)


def draw_business_card(rng: np.random.Generator) -> Image.Image:
    """A 3.5 x 2 inch business card: logo, name, job title, contact lines."""
    dark = rng.random() < 0.2
    paper = random_colour(rng, 20, 70) if dark else mix(random_colour(rng), WHITE, 0.88)
    text_fill, accent = (WHITE if dark else INK), random_colour(rng, 0, 200)
    card = blank_document(rng, 560, 320, paper)
    draw = ImageDraw.Draw(card)
    draw.regular_polygon((70, 70, 30), int(rng.integers(3, 9)), rotation=rng.uniform(0, 90), fill=accent)
    company = pick(rng, ("NORTHWIND STUDIO", "LAKEVALE LEGAL", "PINEHOLM DENTAL", "ASHDOWN & CO"))
    draw_text(draw, (115, 70), company, 20, accent, bold=True, anchor="lm")
    first, last = fake_name(rng)
    draw_text(draw, (40, 150), f"{first.title()} {last.title()}", 30, text_fill, bold=True)
    draw_text(draw, (40, 190), pick(rng, ("Account Manager", "Architect", "Dentist", "Consultant")), 17, accent)
    contacts = (f"Tel 555-01{rng.integers(0, 100):02d}",  # 555-01xx numbers are reserved for fiction
                f"{first[0]}.{last}@example.com".lower(), fake_address(rng)[0].title())
    for row, line in enumerate(contacts):
        draw_text(draw, (40, 228 + row * 22), line, 15, text_fill)
    return with_rounded_corners(card, int(rng.integers(0, 8)))


def draw_receipt(rng: np.random.Generator) -> Image.Image:
    """A narrow till receipt: shop, items with prices, total, barcode."""
    items = int(rng.integers(4, 14))
    width = 300
    receipt = blank_document(rng, width, 300 + 22 * items, mix((250, 250, 245), random_colour(rng), 0.06))
    draw = ImageDraw.Draw(receipt)
    shop = pick(rng, ("CORNER MARKET", "DAILY GROCER", "PINEHOLM FOODS"))
    draw_text(draw, (width // 2, 30), shop, 22, bold=True, anchor="mm")
    draw_text(draw, (width // 2, 56), fake_address(rng)[0], 12, anchor="mm")
    when = f"{us_date(fake_date(rng, 2020, 2024))}  {rng.integers(7, 22)}:{rng.integers(0, 60):02d}"
    draw_text(draw, (width // 2, 74), when, 12, anchor="mm")
    y, total = 100, 0.0
    for _ in range(items):
        price = float(rng.integers(50, 2000)) / 100
        total += price
        draw_text(draw, (20, y), pick(rng, RECEIPT_ITEMS), 14)
        draw_text(draw, (width - 20, y), f"{price:.2f}", 14, anchor="ra")
        y += 22
    draw.line((20, y + 4, width - 20, y + 4), fill=INK, width=1)
    draw_text(draw, (20, y + 14), "TOTAL", 18, bold=True)
    draw_text(draw, (width - 20, y + 14), f"{total:.2f}", 18, bold=True, anchor="ra")
    draw_barcode(draw, (40, y + 60, width - 40, y + 120), rng)
    draw_text(draw, (width // 2, y + 150), "THANK YOU", 14, anchor="mm")
    return with_rounded_corners(receipt, 0)


def draw_letter(rng: np.random.Generator) -> Image.Image:
    """A printed one-page letter: letterhead, date, paragraphs, signature."""
    width, height = 560, 740
    page = blank_document(rng, width, height, (250, 250, 247))
    draw = ImageDraw.Draw(page)
    accent = random_colour(rng, 0, 180)
    draw.regular_polygon((64, 62, 22), int(rng.integers(3, 9)), fill=accent)
    sender = pick(rng, ("NORTHWIND UTILITIES", "LAKEVALE COUNCIL", "HARBOR INSURANCE"))
    draw_text(draw, (98, 62), sender, 20, accent, bold=True, anchor="lm")
    draw.line((40, 98, width - 40, 98), fill=accent, width=2)
    draw_text(draw, (40, 120), us_date(fake_date(rng, 2019, 2024)), 13)
    first, last = fake_name(rng)
    draw_text(draw, (40, 150), f"Dear {first.title()} {last.title()},", 13)
    y = 180
    for _ in range(int(rng.integers(2, 5))):
        y = draw_printed_lines(draw, (40, y), width - 80, int(rng.integers(3, 7)), 13, rng) + 12
    draw_text(draw, (40, y + 10), "Sincerely,", 13)
    draw_scribble(draw, (40, y + 34, 220, y + 80), rng, BLUE_PEN)
    return with_rounded_corners(page, 0)


def draw_form(rng: np.random.Generator) -> Image.Image:
    """A printed form page with labelled boxes, some filled in by hand, and tick boxes."""
    width, height = 560, 740
    page = blank_document(rng, width, height, (250, 250, 247))
    draw = ImageDraw.Draw(page)
    title = pick(rng, ("APPLICATION FORM", "REGISTRATION FORM", "CHANGE OF ADDRESS", "MEMBERSHIP REQUEST"))
    draw_text(draw, (width // 2, 50), title, 24, bold=True, anchor="mm")
    y = draw_printed_lines(draw, (40, 84), width - 80, 2, 12, rng) + 10
    labels = ("FULL NAME", "ADDRESS", "DATE OF BIRTH", "PHONE", "EMAIL", "REFERENCE NO", "SIGNATURE")
    pen = pick(rng, (BLUE_PEN, INK))
    for label in labels[:int(rng.integers(4, len(labels) + 1))]:
        draw.rectangle((40, y, width - 40, y + 56), outline=INK, width=1)
        draw_text(draw, (46, y + 4), label, 11)
        if rng.random() < 0.65:
            draw_handwriting(draw, (60, y + 14, width - 120, y + 54), 32, rng, pen)
        y += 66
    for column, option in enumerate(("YES", "NO", "N/A")):
        box_x = 40 + column * 120
        draw.rectangle((box_x, y + 10, box_x + 18, y + 28), outline=INK, width=2)
        draw_text(draw, (box_x + 26, y + 12), option, 14)
    ticked = 40 + int(rng.integers(3)) * 120
    draw.line((ticked + 3, y + 19, ticked + 8, y + 25, ticked + 17, y + 8), fill=pen, width=3)
    return with_rounded_corners(page, 0)


def draw_handwritten_note(rng: np.random.Generator) -> Image.Image:
    """A sticky note or a ruled notebook page covered in handwriting."""
    pen = pick(rng, (BLUE_PEN, INK, (130, 20, 20)))
    if rng.random() < 0.5:
        paper = pick(rng, ((250, 236, 120), (250, 190, 200), (190, 235, 190), (190, 220, 250)))
        note = blank_document(rng, 420, 420, paper)
        draw_handwriting(ImageDraw.Draw(note), (30, 20, 400, 390), 44, rng, pen)
        return with_rounded_corners(note, 0)
    note = blank_document(rng, 500, 660, (250, 250, 248))
    draw = ImageDraw.Draw(note)
    for rule_y in range(70, 660, 30):
        draw.line((0, rule_y, 500, rule_y), fill=(170, 200, 230), width=1)
    draw.line((60, 0, 60, 660), fill=(230, 140, 140), width=2)
    draw_handwriting(draw, (72, 40, 480, int(rng.integers(250, 640))), 30, rng, pen)
    return with_rounded_corners(note, 0)


OTHER_DOCUMENTS: tuple[tuple[Callable[[np.random.Generator], Image.Image], float], ...] = (
    (draw_other_id_card, 3), (draw_bank_card, 2), (draw_business_card, 2), (draw_receipt, 1.5),
    (draw_letter, 1.5), (draw_form, 1.5), (draw_handwritten_note, 1.5),
)


def draw_other_document(rng: np.random.Generator) -> Image.Image:
    """One of the "others" documents, with the card-like hard negatives weighted up."""
    weights = np.array([weight for _, weight in OTHER_DOCUMENTS])
    drawer, _ = OTHER_DOCUMENTS[int(rng.choice(len(OTHER_DOCUMENTS), p=weights / weights.sum()))]
    return drawer(rng)


DOCUMENT_DRAWERS = {"driving_license": draw_driving_license, "social_security": draw_social_security_card,
                    "others": draw_other_document}


# --- photographing ---------------------------------------------------------------------------

def random_frame_size(rng: np.random.Generator, portrait: bool) -> tuple[int, int]:
    """(width, height): 300 to 1600 px a side, from square to 16:9."""
    long_side = int(rng.integers(300, 1601))
    short_side = max(300, int(long_side * rng.uniform(0.56, 1.0)))
    return (short_side, long_side) if portrait else (long_side, short_side)


def random_surface(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A plain, wood-grained, textured or two-tone surface as a float RGB image."""
    colour = pick(rng, DESK_COLOURS) if rng.random() < 0.75 else mix(random_colour(rng), GREY, 0.5)
    kind = int(rng.integers(4))
    if kind == 0:
        texture = 0.04 * smooth_noise(rng, width, height, 4)
    elif kind == 1:  # wood: noise with many cells across the grain and few along it, so it streaks
        along, across = (width, height) if rng.random() < 0.5 else (height, width)
        grain = rng.standard_normal((max(2, across // 2), 3)).astype(np.float32)
        texture = 0.07 * cv2.resize(grain, (along, across), interpolation=cv2.INTER_CUBIC)
        texture = texture if along == width else texture.T
    elif kind == 2:
        texture = 0.1 * smooth_noise(rng, width, height, width // 3)
    else:  # a backdrop fading into another colour
        return linear_gradient(width, height, colour, mix(random_colour(rng), GREY, 0.4), rng.uniform(0, np.pi))
    return np.float32(colour) * (1 + texture[..., None])


def cast_shadow(surface: np.ndarray, outline: np.ndarray, rng: np.random.Generator) -> None:
    """Darken `surface` in place under and around a flat object's convex outline: a soft shadow."""
    shade = np.zeros(surface.shape[:2], np.float32)
    offset = rng.normal(0, 0.01, 2) * surface.shape[1::-1]
    # Corners in 1/16 px (shift=4) so the anti-aliased edge follows sub-pixel positions.
    cv2.fillConvexPoly(shade, np.round((outline + offset) * 16).astype(np.int32), 1.0, cv2.LINE_AA, shift=4)
    shade = cv2.GaussianBlur(shade, (0, 0), rng.uniform(0.005, 0.02) * max(surface.shape))
    surface *= 1 - rng.uniform(0.15, 0.5) * shade[..., None]


def desk_photo_base(rng: np.random.Generator, width: int, height: int, outlines: Sequence[np.ndarray]) -> np.ndarray:
    """A surface with the shadows of the objects that will lie on it; smooth, so made at quarter size."""
    surface = random_surface(rng, max(8, width // 4), max(8, height // 4))
    for outline in outlines:
        cast_shadow(surface, outline / 4, rng)
    return cv2.resize(np.clip(surface, 0, 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)


def draw_thumb(photo: np.ndarray, corners: np.ndarray, rng: np.random.Generator) -> None:
    """A thumb holding the document: it reaches in from beyond the frame and ends over one of its edges."""
    edge = int(rng.integers(4))
    start, end = corners[edge], corners[(edge + 1) % 4]
    point = start + rng.uniform(0.2, 0.8) * (end - start)
    outward = (point - corners.mean(axis=0)) / np.linalg.norm(point - corners.mean(axis=0))
    short_side = min(np.linalg.norm(corners[1] - corners[0]), np.linalg.norm(corners[2] - corners[1]))
    thickness = rng.uniform(0.15, 0.22) * short_side
    tip = point - outward * thickness * rng.uniform(0.2, 0.6)
    beyond_frame = tuple(int(v) for v in tip + outward * sum(photo.shape[:2]))
    skin = pick(rng, SKIN_TONES)
    # Thick round-capped lines: the shaded outer part first, then the lit middle over it.
    for colour, width_factor, shift in ((mix(skin, INK, 0.25), 1.0, 0.0), (skin, 0.8, 0.06)):
        rounded_end = tuple(int(v) for v in tip + outward * thickness * shift)
        cv2.line(photo, rounded_end, beyond_frame, colour, int(thickness * width_factor), cv2.LINE_AA)
        cv2.circle(photo, rounded_end, int(thickness * width_factor / 2), colour, -1, cv2.LINE_AA)
    nail = tuple(int(v) for v in tip + outward * thickness * 0.35)
    angle = float(np.degrees(np.arctan2(outward[1], outward[0])))
    cv2.ellipse(photo, nail, (int(thickness * 0.35), int(thickness * 0.28)), angle, 0, 360,
                mix(skin, WHITE, 0.4), -1, cv2.LINE_AA)


def stage_on_desk(document: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """The RGBA document on a surface, framed, tilted and shadowed as in a phone photo of it."""
    pixels = np.asarray(document)
    doc_h, doc_w = pixels.shape[:2]
    portrait = (doc_h > doc_w) != (rng.random() < 0.2)  # people mostly frame a page upright, a card sideways
    width, height = random_frame_size(rng, portrait)
    partly_out = rng.random() < 0.08
    fill = rng.uniform(1.0, 1.3) if partly_out else rng.uniform(0.45, 0.9)
    scale = fill * min(width / doc_w, height / doc_h)
    half = np.float32([doc_w, doc_h]) * scale / 2
    angle = np.deg2rad(rng.normal(0, 4))
    rotation = np.float32([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    frame_half = np.float32([width, height]) / 2
    room = frame_half * 0.3 if partly_out else np.maximum(frame_half - half, 0)
    centre = frame_half + rng.uniform(-1, 1, 2) * room
    # Each corner pulled on its own: the phone is never quite parallel to the desk.
    corners = (np.float32([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half) @ rotation.T + centre
    corners = (corners + rng.normal(0, rng.uniform(0, 0.05) * half.mean(), (4, 2))).astype(np.float32)
    base = desk_photo_base(rng, width, height, [corners])
    if scale < 1:  # shrink first: warpPerspective does not anti-alias, and small text would turn jagged
        shrunk_size = (max(2, round(doc_w * scale)), max(2, round(doc_h * scale)))
        pixels = cv2.resize(pixels, shrunk_size, interpolation=cv2.INTER_AREA)
    src_h, src_w = pixels.shape[:2]
    source = np.float32([[0, 0], [src_w, 0], [src_w, src_h], [0, src_h]])
    warped = cv2.warpPerspective(pixels, cv2.getPerspectiveTransform(source, corners), (width, height),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    alpha = warped[..., 3].astype(np.float32) / 255
    photo = cv2.blendLinear(np.ascontiguousarray(warped[..., :3]), base, alpha, 1 - alpha)
    if rng.random() < 0.15:
        draw_thumb(photo, corners, rng)
    return photo


def random_convex_shape(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Corners of a polygon, from a triangle to a near-circle, somewhere in a width x height frame."""
    sides = pick(rng, (3, 4, 4, 5, 6, 40))
    radii = rng.uniform(0.05, 0.35) * min(width, height) * np.float32([1, rng.uniform(0.4, 1)])
    angles = np.linspace(0, 2 * np.pi, sides, endpoint=False) + rng.uniform(0, 2 * np.pi)
    centre = rng.uniform(0, 1, 2) * [width, height]
    return (np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii + centre).astype(np.float32)


def draw_scene(rng: np.random.Generator) -> np.ndarray:
    """A photo-like picture with no document: flat objects lying on a surface or before a backdrop."""
    width, height = random_frame_size(rng, portrait=rng.random() < 0.4)
    shapes = [random_convex_shape(rng, width, height) for _ in range(int(rng.integers(1, 9)))]
    scene = desk_photo_base(rng, width, height, shapes)
    for shape in shapes:
        colour = mix(random_colour(rng), GREY, rng.uniform(0, 0.6))
        cv2.fillConvexPoly(scene, np.round(shape * 16).astype(np.int32), colour, cv2.LINE_AA, shift=4)
    return scene


def lighting_gain(rng: np.random.Generator) -> np.ndarray:
    """A coarse brightness grid: light falling off across the frame, sometimes a bright spot or a shadow."""
    y, x = np.mgrid[0:1:48j, 0:1:48j].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    gain = rng.uniform(0.8, 1.1) + rng.uniform(0.05, 0.45) * (along - along.mean())
    if rng.random() < 0.2:  # a flash or lamp reflection
        spot_x, spot_y = rng.uniform(0.2, 0.8, 2)
        gain += rng.uniform(0.2, 0.6) * np.exp(-((x - spot_x) ** 2 + (y - spot_y) ** 2) / rng.uniform(0.005, 0.03))
    if rng.random() < 0.3:  # a straight-edged shadow, as from a phone or a hand above the desk
        edge_angle = rng.uniform(0, 2 * np.pi)
        side = (x - rng.uniform(0.2, 0.8)) * np.cos(edge_angle) + (y - rng.uniform(0.2, 0.8)) * np.sin(edge_angle)
        gain *= cv2.GaussianBlur(np.where(side > 0, rng.uniform(0.5, 0.8), 1).astype(np.float32), (0, 0), 1.5)
    return gain.astype(np.float32)


def camera_effects(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uneven light, colour cast, focus blur, sensor noise, and sometimes the phone held sideways."""
    height, width = image.shape[:2]
    colour_cast = rng.normal(1, 0.04, 3).astype(np.float32)
    gain = cv2.resize(lighting_gain(rng)[..., None] * colour_cast, (width, height), interpolation=cv2.INTER_LINEAR)
    photo = cv2.multiply(image, gain, dtype=cv2.CV_8U)
    if rng.random() < 0.75:
        photo = cv2.GaussianBlur(photo, (0, 0), rng.uniform(0.3, 1.5) * max(width, height) / 800)
    # Uniform integer noise: much cheaper to draw than Gaussian, and looks the same at this strength.
    noise_level = int(rng.integers(2, 12))
    noise = rng.integers(-noise_level, noise_level + 1, photo.shape, dtype=np.int16)
    photo = cv2.add(photo, noise, dtype=cv2.CV_8U)
    turns = int(rng.choice(4, p=[0.84, 0.06, 0.05, 0.05]))
    return np.ascontiguousarray(np.rot90(photo, turns))


# --- the dataset -----------------------------------------------------------------------------

def render_sample(seed: int, class_index: int, image_index: int) -> bytes:
    """JPEG bytes of image `image_index` of class `class_index`; depends on nothing else."""
    rng = np.random.default_rng([seed, class_index, image_index])
    class_name = CLASS_NAMES[class_index]
    if class_name == "others" and rng.random() < SCENE_FRACTION:
        image = draw_scene(rng)
    else:
        image = stage_on_desk(DOCUMENT_DRAWERS[class_name](rng), rng)
    photo = camera_effects(image, rng)
    quality = int(rng.integers(35, 96))
    _, encoded = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes()


def write_sample(job: tuple[Path, int, int, int]) -> None:
    path, seed, class_index, image_index = job
    path.write_bytes(render_sample(seed, class_index, image_index))


def quiet_worker() -> None:
    """A pool worker's start: one OpenCV thread (the processes already keep every core busy), and a Ctrl-C left
    to the main process, which stops the pool (a worker of its own would print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


def make_demo_data(out_dir: str | Path, per_class: int = 250, seed: int = 0, force: bool = False,
                   *, workers: int | None = None) -> dict[str, int]:
    """Write per_class JPEGs into out_dir/<class>/ for each class; return counts per class.

    Refuses a folder that already holds images unless `force`. `workers` processes render in
    parallel (default: one per CPU); the files are the same whatever their number.
    """
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    out_dir = Path(out_dir)
    check_write_target(out_dir, "--out", folder=True, subfolders=CLASS_NAMES)  # no class folder that is a link
    existing = list_images(out_dir) if out_dir.is_dir() else []
    if existing and not force:
        raise UserError(f"{out_dir} already holds {len(existing)} images; "
                        f"pass --force to write into it anyway or choose another --out")
    # Written into a hidden folder first and moved into place at the end: a run stopped half-way (Ctrl-C)
    # leaves no partial dataset that a later run would train on; the next run starts again from scratch.
    partial = out_dir / ".demo-data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    jobs = []
    for class_index, class_name in enumerate(CLASS_NAMES):
        (partial / class_name).mkdir(parents=True, exist_ok=True)
        jobs += [(partial / class_name / f"{class_name}_{image_index:04d}.jpg", seed, class_index, image_index)
                 for image_index in range(per_class)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers == 1:
        for job in jobs:
            write_sample(job)
            stop_if_asked()
    else:
        # Workers come from a fork server, not a fork of this process: a child forked after OpenCV's or
        # torch's thread pools have run can deadlock on a lock a vanished thread held (seen with
        # cv2.setNumThreads).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # imported once by the server, not by every worker
        with context.Pool(workers, initializer=quiet_worker) as pool:
            for _ in pool.imap_unordered(write_sample, jobs, chunksize=8):
                stop_if_asked()
    for class_name in CLASS_NAMES:  # before anything moves: a user's own file of a demo name is never replaced
        for written in (partial / class_name).iterdir() if (out_dir / class_name).is_dir() else ():
            there = out_dir / class_name / written.name
            if there.is_symlink() or (there.exists() and there.read_bytes() != written.read_bytes()):
                shutil.rmtree(partial)
                raise UserError(f"{shown(there)} exists and is not the demo image of that name: it is never "
                                f"replaced; move it, or choose another --out")
    for class_name in CLASS_NAMES:
        own_folder(out_dir / class_name)  # never a link: nothing written through it
        for written in sorted((partial / class_name).iterdir()):
            os.replace(written, out_dir / class_name / written.name)
    shutil.rmtree(partial)
    return {class_name: per_class for class_name in CLASS_NAMES}
