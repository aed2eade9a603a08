"""Find images -> pandas index -> split -> decode/resize/normalise -> tensors.

One image's path from disk to the network:
    read_image (OpenCV, 8-bit RGB) -> cv2.resize to img_size x img_size (INTER_AREA)
    -> uint8 array, kept in memory for the run -> to_model_input (scale to [0, 1], CHW float32)
    on the device that runs the model, which normalises with its own backbone's mean/std.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pillow_heif
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from MLPipeline.Common import UserError, log, progress_reporter

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".heic", ".heif", ".avif",
                    ".jp2"}
# What phones, cameras and file managers leave beside photos: passed over like hidden files, counted in one line.
SIDECAR_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini"}
SIDECAR_EXTENSIONS = {".aae", ".ini", ".json", ".md", ".thm", ".txt", ".xmp"}
# Any other file in a class folder is skipped and named with a reason; for these the reason says what to do.
NOT_IMAGE_REASONS = {".pdf": "PDF: export the pages as images",
                     ".mov": "video (a Live Photo's motion?): export a frame as an image",
                     ".mp4": "video: export a frame as an image",
                     ".dng": "camera RAW: export it as JPEG"}
PILLOW_FORMATS = {"HEIF", "AVIF"}  # OpenCV cannot decode HEIF and ignores the rotation AVIF stores; Pillow does both
# Pre-split layouts, first match wins; folder names are matched case-insensitively.
PRESPLIT_PAIRS = (("training_data", "testing_data"), ("train", "test"), ("train", "val"))
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # default of --max-pixels: Pillow's decompression-bomb limit (about 89 megapixels)
MIN_SIDE = 8  # smaller images carry nothing to classify


class BadImageError(Exception):
    """This one file cannot be used as an image; the run skips it."""


class UnreadableFolder(UserError):
    """A folder the system will not list: the end of the run for the data folder, a warning below it."""


def is_passed_over(name: str) -> bool:
    """Hidden files and folders, and sidecar files: never images, and too common to name one by one."""
    return name.startswith(".") or name.lower() in SIDECAR_NAMES or Path(name.lower()).suffix in SIDECAR_EXTENSIONS


def not_image_reason(path: Path) -> str:
    """Why a file is not one we decode, judged by its extension; "" for the supported image types."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return ""
    return NOT_IMAGE_REASONS.get(suffix, f"unsupported file type {suffix or '(no extension)'}")


def is_image_file(path: Path) -> bool:
    return path.is_file() and not is_passed_over(path.name) and not not_image_reason(path)


def folder_entries(folder: Path) -> list[os.DirEntry]:
    """A folder's entries, sorted by name (so files come out in path order)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        raise UnreadableFolder(f"cannot read folder {folder}: {error.strerror or error}") from None


def folder_key(folder: Path) -> tuple[int, int]:
    """The same for every path (link or not) that leads to one folder."""
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def find_files(folder: Path, seen: dict[tuple[int, int], Path]) -> tuple[list[Path], int]:
    """Every file under `folder` in path order, symlinked folders followed; and how many entries were passed over.

    An unreadable folder is named and passed over. A folder in `seen` (met before: a symlink loop, or a second
    link to it) is named once and not followed again, so a loop cannot list files forever.
    """
    key = folder_key(folder)
    if key in seen:
        log.warning("warning: folder %s leads back to %s (a symlink loop or a second link); not followed again",
                    folder, seen[key])
        return [], 0
    seen[key] = folder
    try:
        entries = folder_entries(folder)
    except UnreadableFolder as error:
        log.warning("warning: %s; passed over", error)
        return [], 0
    files, passed_over = [], 0
    for entry in entries:
        path = folder / entry.name
        if is_passed_over(entry.name):
            passed_over += 1
        elif entry.is_dir():  # follows symlinks
            found, passed = find_files(path, seen)
            files, passed_over = files + found, passed_over + passed
        else:  # a file, or a broken link: decoding will name it
            files.append(path)
    return files, passed_over


def list_images(folder: Path) -> list[Path]:
    """Every supported image under `folder`, sorted; hidden, sidecar and other files are left out."""
    return [path for path in find_files(Path(folder), {})[0] if not not_image_reason(path)]


def index_folder(folder: Path) -> pd.DataFrame:
    """One row (path, label, skipped) per file under folder/<class>/; `skipped` says why a file that is not a
    supported image cannot be used ("" for images). Class folders without images are reported and left out.
    """
    folder = Path(folder)
    entries = folder_entries(folder)  # the data folder itself must be readable
    rows, passed_over = [], 0
    for class_dir in (folder / entry.name for entry in entries if entry.is_dir() and not is_passed_over(entry.name)):
        files, passed = find_files(class_dir, {folder_key(folder): folder})
        passed_over += passed
        reasons = [not_image_reason(path) for path in files]
        if all(reasons):
            others = f" ({len(files)} other file(s), e.g. {files[0].name}: {reasons[0]})" if files else ""
            log.warning("warning: class folder %s holds no images%s; left out", class_dir, others)
            continue
        for path, reason in zip(files, reasons):
            rows.append((str(path), class_dir.name, reason))
            if reason:
                log.warning("warning: skipped %s: %s", path, reason)
    if passed_over:
        log.info("passed over %d hidden or sidecar file(s) in the class folders of %s (system files, photo "
                 "metadata, notes)", passed_over, folder)
    loose = [entry for entry in entries if is_image_file(folder / entry.name)]
    if loose:
        log.warning("warning: %d image(s) directly in %s are not in a class folder; ignored", len(loose), folder)
    return pd.DataFrame(rows, columns=["path", "label", "skipped"])


def find_presplit(data_dir: Path) -> tuple[Path, Path] | None:
    """The (train, test) folders of a pre-split layout, or None for a plain folder of classes."""
    subfolders = {entry.name.lower(): Path(data_dir) / entry.name for entry in folder_entries(Path(data_dir))
                  if entry.is_dir() and not is_passed_over(entry.name)}
    for train_name, test_name in PRESPLIT_PAIRS:
        if train_name in subfolders and test_name in subfolders:
            train_dir, test_dir = subfolders[train_name], subfolders[test_name]
            log.info("pre-split layout: training on %s, testing on %s", train_dir.name, test_dir.name)
            ignored = sorted(p.name for p in subfolders.values() if p not in (train_dir, test_dir))
            if ignored:
                log.warning("warning: folder(s) %s in %s are not part of the train/test pair; ignored",
                            ", ".join(ignored), data_dir)
            return train_dir, test_dir
    return None


def check_data_dir(data_dir: Path) -> None:
    if not Path(data_dir).exists():
        raise UserError(f"data folder {data_dir} does not exist")
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} is not a folder")


def build_index(data_dir: Path, test_size: float = 0.2, seed: int = 42) -> pd.DataFrame:
    """Index every image under data_dir as (path, label, split), split being 'train' or 'test'."""
    check_data_dir(data_dir)
    presplit = find_presplit(data_dir)
    if presplit:
        train_index, test_index = (index_folder(folder) for folder in presplit)
        index = pd.concat([train_index.assign(split="train"), test_index.assign(split="test")], ignore_index=True)
        unknown = sorted(set(test_index.label) - set(train_index.label))
        if unknown:
            raise UserError(f"{presplit[1]} has classes that {presplit[0]} lacks: {', '.join(unknown)}")
        check_classes(index, data_dir)
        return index
    index = index_folder(data_dir)
    check_classes(index, data_dir)
    return stratified_split(index, test_size, seed)


def check_classes(index: pd.DataFrame, data_dir: Path) -> None:
    if index.empty:
        raise UserError(f"no images found in {data_dir}: put them in one sub-folder per class "
                        f"(e.g. {data_dir}/cats/*.jpg, {data_dir}/dogs/*.jpg); "
                        f"recognised: {' '.join(sorted(IMAGE_EXTENSIONS))}")
    if index.label.nunique() < 2:
        raise UserError(f"{data_dir} has images of {index.label.nunique()} class; at least 2 class folders are needed")


def stratified_split(index: pd.DataFrame, fraction: float, seed: int, to_split: str = "test") -> pd.DataFrame:
    """Move round(fraction * n) 'train' images of each class (at least one) to `to_split`, by a seeded shuffle.

    Each class has its own random stream, so adding a class or an image to one class leaves the others' split.
    """
    index = index.assign(split=index.get("split", "train"))
    not_skipped = index.get("skipped", "") == ""  # files known not to be images are not drawn
    for label, rows in index[(index.split == "train") & not_skipped].groupby("label"):
        rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(label))])  # fsencode: any folder name
        if len(rows) < 2:
            raise UserError(f"class '{label}' has {len(rows)} training image; each class needs at least 2 "
                            f"to be split into train and {to_split}: add images or remove the folder")
        moved = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        index.loc[rng.permutation(rows.index)[:moved], "split"] = to_split
    return index


def read_image(path: str | Path, min_size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file to an 8-bit RGB array (grayscale, alpha, 16-bit, palette and CMYK included).

    EXIF orientation is applied. Given `min_size`, big JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the result
    still has at least that many pixels a side: several times faster, and nothing is lost after the resize.
    Images over `max_pixels` (default MAX_PIXELS) are refused before they are decoded.
    Raises BadImageError, naming the reason, for files that are not usable images.
    """
    data = np.fromfile(path, dtype=np.uint8)  # unlike cv2.imread, works with non-ASCII names everywhere
    if data.size == 0:
        raise BadImageError("empty file")
    width, height, image_format = read_header(data, max_pixels or MAX_PIXELS)
    if min(width, height) < MIN_SIDE:
        raise BadImageError(f"{width}x{height} is too small to classify")
    if image_format == "JPEG" and not jpeg_is_complete(data.tobytes()):
        raise BadImageError("truncated JPEG (no end-of-image marker)")  # OpenCV would fill the rest with grey
    if image_format in PILLOW_FORMATS:
        return decode_with_pillow(data)
    reduce = image_format == "JPEG" and min_size is not None
    try:
        image = cv2.imdecode(data, reduced_read_flag(width, height, min_size) if reduce else cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        return decode_with_pillow(data)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_header(data: np.ndarray, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, format) from the file's header alone; images over max_pixels are refused here."""
    register_heif()
    # Pillow refuses files over twice its own limit before their size can be read: keep its limit at least
    # ours, so that --max-pixels is the one limit (checked below, before every decode).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    too_large = f"is over {max_pixels} pixels, too large to decode safely (raise --max-pixels to decode it)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own cap below
            with Image.open(io.BytesIO(data.tobytes())) as header:  # reads the header only
                width, height, image_format = *header.size, header.format
    except Image.DecompressionBombError:
        raise BadImageError(f"the image {too_large}") from None
    except Exception:
        raise BadImageError("not an image, or corrupt") from None
    if width * height > max_pixels:
        raise BadImageError(f"{width}x{height} {too_large}")
    return width, height, image_format


@functools.cache
def register_heif() -> None:
    """Let Pillow open HEIC/HEIF phone photos (pillow-heif applies their rotation); once, at the first decode."""
    pillow_heif.register_heif_opener()


def jpeg_is_complete(data: bytes) -> bool:
    """Whether the main image's compressed data ends with an end-of-image marker (FF D9).

    Walks the header segments to the first start-of-scan (FF DA), so the marker of an EXIF thumbnail does
    not count and data that phones append after the image does not matter. Compressed data never holds
    FF D9 (the format escapes FF bytes), so the first one after the scan starts is the real end.
    """
    position = 2  # after the start-of-image marker
    while position + 4 <= len(data) and data[position] == 0xFF:
        if data[position + 1] == 0xDA:
            return data.find(b"\xff\xd9", position) != -1
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return position + 4 <= len(data)  # a header we cannot walk: let the decoder judge it


def reduced_read_flag(width: int, height: int, min_size: int) -> int:
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if min(width, height) // factor >= min_size:
            return flag
    return cv2.IMREAD_COLOR


def decode_with_pillow(data: np.ndarray) -> np.ndarray:
    """Formats OpenCV lacks or gets wrong (GIF, HEIF, AVIF, some TIFFs): Pillow decodes them, first frame only."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception as error:
        raise BadImageError(f"cannot be decoded ({error})") from None


def resize(image: np.ndarray, img_size: int) -> np.ndarray:
    """Squash to img_size x img_size as the original did (aspect ratio not kept); INTER_AREA avoids aliasing."""
    return cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_AREA)


def load_image(path: str | Path, img_size: int, max_pixels: int | None = None) -> np.ndarray:
    """A file as an img_size x img_size x 3 uint8 RGB array."""
    return resize(read_image(path, img_size, max_pixels), img_size)


def load_or_reason(path: str, img_size: int, max_pixels: int | None = None) -> np.ndarray | str:
    """One file as an img_size x img_size x 3 uint8 array, or the reason it cannot be used."""
    try:
        return load_image(path, img_size, max_pixels)
    except (BadImageError, cv2.error) as error:
        return str(error).strip().splitlines()[-1]
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"


@dataclass
class DecodedChunk:
    """Consecutive files of a stream: the positions (in the stream's list) and images of the good ones."""
    positions: list[int]
    images: np.ndarray  # len(positions) x S x S x 3 uint8
    skipped: dict[str, str]  # bad path -> reason


def stream_images(paths: list[str], img_size: int, chunk_size: int = 64, chunks_ahead: int = 2,
                  max_pixels: int | None = None) -> Iterator[DecodedChunk]:
    """Decode and resize files in chunks, yielded in order as each is ready; each bad file is logged by name.

    A thread per core decodes (OpenCV releases the GIL, so threads give a real speed-up with no process
    start-up cost), at most `chunks_ahead` chunks ahead of the consumer: decoding overlaps whatever the
    consumer does with a chunk (the backbone), and memory holds a few chunks, never the whole dataset.
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        pending = deque()
        for start in range(0, len(paths), chunk_size):
            positions = range(start, min(start + chunk_size, len(paths)))
            pending.append([(position, pool.submit(load_or_reason, paths[position], img_size, max_pixels))
                            for position in positions])
            if len(pending) > chunks_ahead:
                yield collect_chunk(pending.popleft(), paths, img_size)
        while pending:
            yield collect_chunk(pending.popleft(), paths, img_size)


def collect_chunk(futures: list, paths: list[str], img_size: int) -> DecodedChunk:
    """Wait for one chunk's decodes; name each bad file."""
    results = [(position, future.result()) for position, future in futures]
    skipped = {paths[position]: result for position, result in results if isinstance(result, str)}
    for path, reason in skipped.items():
        log.warning("warning: skipped %s: %s", path, reason)
    good = [(position, result) for position, result in results if not isinstance(result, str)]
    images = np.stack([image for _, image in good]) if good else np.zeros((0, img_size, img_size, 3), np.uint8)
    return DecodedChunk([position for position, _ in good], images, skipped)


def load_images(paths: list[str], img_size: int, max_pixels: int | None = None,
                ) -> tuple[np.ndarray, dict[str, str]]:
    """Decode and resize files into memory; returns (N x S x S x 3 uint8 of the good ones, {bad path: reason}).

    For a few files (prediction of a handful, tests); datasets go through stream_images chunk by chunk.
    """
    chunks = list(stream_images(paths, img_size, max_pixels=max_pixels))
    images = [chunk.images for chunk in chunks]
    return (np.concatenate(images) if images else np.zeros((0, img_size, img_size, 3), np.uint8),
            {path: reason for chunk in chunks for path, reason in chunk.skipped.items()})


def decode_to_disk(paths: list[str], img_size: int, folder: Path, max_pixels: int | None = None,
                   ) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Decode the files once into a memory-mapped temporary file under `folder`, for training that reads
    images every epoch (augmentation, unfrozen layers); returns (N x S x S x 3 uint8 of the good ones, their
    positions in `paths`, {bad path: reason}). Batches are read from disk (the page cache, mostly) as needed,
    so memory does not grow with the dataset."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder, prefix="decoded-") as file:  # unlinked at once: gone with the run
        images = np.memmap(file, np.uint8, "w+", shape=(max(len(paths), 1), img_size, img_size, 3))
    count, positions, skipped = 0, [], {}
    update = progress_reporter("decode", len(paths))
    for chunk in stream_images(paths, img_size, max_pixels=max_pixels):
        images[count:count + len(chunk.positions)] = chunk.images
        count += len(chunk.positions)
        positions += chunk.positions
        skipped.update(chunk.skipped)
        update(count + len(skipped))
    return images[:count], positions, skipped


def mark_skipped(index: pd.DataFrame, skipped: dict[str, str]) -> pd.DataFrame:
    """The index with its `skipped` column completed by the decode: why each file could not be used, "" for
    the usable ones. Reasons found before decoding (not an image, a duplicate) are kept."""
    earlier = index.skipped if "skipped" in index else [""] * len(index)
    return index.assign(skipped=[skipped.get(path, reason) for path, reason in zip(index.path, earlier)])


def mark_duplicates(index: pd.DataFrame, dedupe: bool = False) -> pd.DataFrame:
    """The index with a `duplicate_of` column: for a held-out (test or val) file with the same bytes as a
    training file, that training file ("" for the others).

    Each is named in a warning: a test image the model was trained on inflates its test score. With `dedupe`
    the held-out copy is skipped and the training copy kept.
    """
    copies = held_out_copies(usable(index))
    for copy, original in copies.items():
        if dedupe:
            log.warning("warning: skipped %s: duplicate of %s", copy, original)
        else:
            log.warning("warning: %s is an exact copy of training file %s (--dedupe keeps only the training copy)",
                        copy, original)
    index = index.assign(duplicate_of=[copies.get(path, "") for path in index.path])
    if dedupe:
        index = index.assign(skipped=index.skipped.where(index.duplicate_of == "",
                                                         "duplicate of " + index.duplicate_of))
    return index


def held_out_copies(index: pd.DataFrame) -> dict[str, str]:
    """{held-out path: training path} for files with the same bytes in train and in test or val.

    Only files whose size a file of the other side shares are read and hashed: most files never are.
    """
    sizes = index.path.map(file_size)
    in_train = index.split == "train"
    shared_sizes = (set(sizes[in_train]) & set(sizes[~in_train])) - {-1}
    candidates = index[sizes.isin(shared_sizes)].assign(digest=lambda rows: rows.path.map(file_digest))
    candidates = candidates[candidates.digest != ""]
    originals = candidates[candidates.split == "train"].drop_duplicates("digest").set_index("digest").path
    copies = candidates[(candidates.split != "train") & candidates.digest.isin(originals.index)]
    return dict(zip(copies.path, copies.digest.map(originals)))


def file_size(path: str) -> int:
    """The file's size in bytes; -1 when it cannot be read (decoding will say why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def file_digest(path: str) -> str:
    """blake2b of the file's bytes, read 1 MiB at a time; "" when it cannot be read (decoding will say why)."""
    digest = hashlib.blake2b()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def usable(index: pd.DataFrame) -> pd.DataFrame:
    """The rows of the files that decoded (the order of the decoded images)."""
    return index[index.skipped == ""]


def skip_reasons(index: pd.DataFrame) -> dict[str, str]:
    """{path: why it was not used} for every file of the index that was not."""
    skipped = index[index.skipped != ""]
    return dict(zip(skipped.path, skipped.skipped))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W scaled to [0, 1] (the model normalises it further).

    Runs on whatever device `images` is on, so the uint8 batch (4x smaller) is what crosses to a GPU.
    """
    return images.permute(0, 3, 1, 2).float().div(255)


def make_augmenter(img_size: int, flips: bool = False):
    """Train-time augmentation for photographed documents, on uint8 N x S x S x 3 batches, a new draw per image.

    Crops (75-100% of the area, aspect 0.85-1.18), rotations of up to 8 degrees, perspective (half the
    images) and changes of brightness, contrast and saturation (+-30%) are what real photos of a card vary
    in. The geometric ones are one homography per image, applied to the whole batch by a single
    grid_sample, and the colour changes are one linear map per image: 8 images at 200 px take about 13 ms on
    one core.
    Flips are off unless asked for: mirrored text never occurs in a real photo.
    """
    # Each output pixel's position in [-1, 1], as homogeneous (x, y, 1): where the homographies send it.
    positions = F.affine_grid(torch.eye(2, 3)[None], [1, 3, img_size, img_size], align_corners=False).view(-1, 2)
    positions = torch.cat([positions, torch.ones(len(positions), 1)], 1)

    def augment(images: torch.Tensor) -> torch.Tensor:
        count = len(images)
        pixels = images.permute(0, 3, 1, 2).float()
        points = torch.einsum("njk,pk->npj", random_homographies(count, flips), positions)  # count x pixels x 3
        grid = (points[..., :2] / points[..., 2:]).view(count, img_size, img_size, 2)
        warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return jitter_colours(warped).clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1)
    return augment


def uniform(count: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(count).uniform_(low, high)


def random_homographies(count: int, flips: bool) -> torch.Tensor:
    """count x 3 x 3 maps from output to input positions: crop . rotation . perspective (. flip)."""
    area, ratio = uniform(count, 0.75, 1.0), torch.exp(uniform(count, np.log(0.85), np.log(1.18)))
    half_width, half_height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    crop = torch.zeros(count, 3, 3)
    crop[:, 0, 0], crop[:, 1, 1], crop[:, 2, 2] = half_width, half_height, 1
    crop[:, 0, 2] = uniform(count, -1, 1) * (1 - half_width)
    crop[:, 1, 2] = uniform(count, -1, 1) * (1 - half_height)
    angle = uniform(count, -8, 8).deg2rad()
    rotation = torch.zeros(count, 3, 3)
    rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 2, 2] = angle.cos(), -angle.sin(), 1
    rotation[:, 1, 0], rotation[:, 1, 1] = angle.sin(), angle.cos()
    perspective = torch.eye(3).repeat(count, 1, 1)
    perspective[:, 2, :2] = uniform(2 * count, -0.15, 0.15).view(count, 2) * (torch.rand(count, 1) < 0.5)
    if flips:
        perspective[:, 0, 0] = torch.where(torch.rand(count) < 0.5, -1.0, 1.0)
    return crop @ rotation @ perspective


def jitter_colours(pixels: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a random factor in [0.7, 1.3], per image.

    In turn: pixels * brightness; then (pixels - mean grey) * contrast + mean grey; then grey + (pixels -
    grey) * saturation. Grey (luma) is linear with weights summing to 1, so the three are one linear map of
    each image's colours: contrast * brightness * (saturation * pixels + (1 - saturation) * grey) +
    (1 - contrast) * brightness * the image's mean grey, applied in one pass.
    """
    count, luma = len(pixels), torch.tensor([0.299, 0.587, 0.114])
    brightness, contrast, saturation = (uniform(count, 0.7, 1.3).view(count, 1, 1) for _ in range(3))
    colours = contrast * brightness * (saturation * torch.eye(3) + (1 - saturation) * luma)  # count x 3 x 3
    offset = (1 - contrast) * brightness * (pixels.mean((2, 3)) @ luma).view(count, 1, 1)
    return torch.baddbmm(offset, colours, pixels.flatten(2)).view_as(pixels)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices -> one-hot float targets, as the original encoded its labels."""
    return torch.nn.functional.one_hot(labels, num_classes).float()


# --- The original project's entry points (see README: Coming from the original project)

class CreateDataset:
    """The original's data loader, on this project's decode path: `create_dataset` returns what its script
    turned into tensors.

    The original script makes a new CreateDataset for each folder and keeps only the arrays, so the class
    names would be lost on the way to TrainRestNet; `last_classes` keeps those of the last folder read
    (TrainRestNet's `classes=` overrides it).
    """
    last_classes: list[str] | None = None

    def create_dataset(self, folder: str | Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The images of folder/<class>/* as (N x 3 x H x W float32 in [0, 1], N x C one-hot float32).

        Classes are the sub-folders in sorted order, each a column of the one-hot labels; unreadable files
        are skipped with a warning, as in training. Images are squares: a checkpoint has one image size
        and prediction resizes to it, so width must equal height.
        """
        if width != height:
            raise UserError(f"create_dataset resizes to squares, so width and height must be equal, not "
                            f"{width} and {height}: the trained model predicts on {width}x{width} images")
        check_data_dir(folder)
        index = index_folder(folder)
        check_classes(index, folder)
        images, skipped = load_images(index.path.tolist(), width)
        if len(images) == 0:
            raise UserError(f"no readable images in {folder}")
        classes = sorted(index.label.unique())
        labels = torch.tensor(usable(mark_skipped(index, skipped)).label.map(classes.index).to_numpy())
        CreateDataset.last_classes = classes
        return to_model_input(torch.from_numpy(images)).numpy(), one_hot(labels, len(classes)).numpy()
