"""The tool's real-world files: which files of a folder are images (links and loops, sidecars, copies
across splits: index_folder), and reading one into 8-bit RGB pixels (every format, EXIF rotation, size
limits, truncation: read_image, and loader, the load_image engine.py hands the recipe).

`index_folder` is the recipe's step of the same name made safe on a phone's export, a shared drive or a folder
of links. `read_image` either returns the pixels or raises BadImageError with the reason, for any file: not an
image, corrupt, truncated, too big, unreadable.
"""
from __future__ import annotations

import functools
import hashlib
import io
import operator
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from MLPipeline.CreateDataset import IMAGE_EXTENSIONS, check_data_dir, find_presplit  # noqa: F401 (re-exported)
from MLPipeline.CreateDataset import BadImageError, UserError, log, resize

# What phones, cameras and file managers leave beside photos: passed over like hidden files, counted in one line.
SIDECAR_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini"}
SIDECAR_EXTENSIONS = {".aae", ".ini", ".json", ".md", ".thm", ".txt", ".xmp"}
# Any other file in a class folder is skipped and named with a reason; for these the reason says what to do.
NOT_IMAGE_REASONS = {".pdf": "PDF: export the pages as images",
                     ".mov": "video (a Live Photo's motion?): export a frame as an image",
                     ".mp4": "video: export a frame as an image",
                     ".dng": "camera RAW: export it as JPEG"}

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
    return os.path.isfile(path) and not is_passed_over(path.name) and not not_image_reason(path)


def is_folder(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder, links followed; False when that cannot be known (a link into a folder the
    run may not search, a link loop): it is then listed as a file, and decoding names why it cannot be read."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def folder_entries(folder: Path) -> list[os.DirEntry]:
    """A folder's entries, sorted by name (so files come out in path order)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=operator.attrgetter("name"))
    except OSError as error:
        raise UnreadableFolder(f"cannot read folder {folder}: {error.strerror or error}") from None


def folder_key(folder: Path) -> tuple[int, int]:
    """The same for every path (link or not) that leads to one folder."""
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def find_files(folder: Path, seen: dict[tuple[int, int], Path]) -> tuple[list[Path], int]:
    """Every file under `folder` in path order, symlinked folders followed; and how many entries were passed over.

    An unreadable folder is named and passed over. A folder `seen` under another path (met before: a symlink
    loop, or a second link to it) is named once and not followed again, so a loop cannot list files forever.
    """
    key = folder_key(folder)
    if seen.get(key, folder) != folder:
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
        elif is_folder(entry):  # follows symlinks
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
    # Real class folders first, each known before any is read: a link to one of them (a class folder that is
    # a link, or a link inside another class) is not followed, so its images are used once, under its name.
    class_dirs = sorted((folder / entry.name for entry in entries if is_folder(entry)
                         and not is_passed_over(entry.name)), key=os.path.islink)
    seen = {folder_key(folder): folder, **{folder_key(path): path for path in class_dirs if not path.is_symlink()}}
    rows, passed_over = [], 0
    for class_dir in class_dirs:
        first = seen.get(folder_key(class_dir), class_dir)
        if first not in (class_dir, folder):  # a link to the data folder is a loop: find_files names it
            log.warning("warning: class folder %s is a link to %s, read already: its images are used once, "
                        "under '%s'", class_dir, first, first.name)
            continue
        files, passed = find_files(class_dir, seen)
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


def mark_duplicates(index: pd.DataFrame, dedupe: bool = False) -> pd.DataFrame:
    """The index with a `duplicate_of` column: for a held-out (test or val) file with the same bytes as a
    training file, that training file ("" for the others).

    Each is named in a warning: a test image the model was trained on inflates its test score. With `dedupe`
    the held-out copy is skipped and the training copy kept.
    """
    copies = held_out_copies(index[index.skipped == ""])
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
    candidates = index[sizes.isin(shared_sizes)]
    candidates = candidates.assign(digest=candidates.path.map(file_digest)).query("digest != ''")
    originals = candidates[candidates.split == "train"].drop_duplicates("digest").set_index("digest").path
    copies = candidates[(candidates.split != "train") & candidates.digest.isin(originals.index)]
    return dict(zip(copies.path, copies.digest.map(originals)))


def file_size(path: str) -> int:
    """The file's size in bytes; -1 when it cannot be read or is no regular file (decoding will say why): a
    link to /dev/zero must never be hashed, it has no end."""
    try:
        status = os.stat(path)
    except OSError:
        return -1
    return status.st_size if stat.S_ISREG(status.st_mode) else -1


def file_digest(path: str) -> str:
    """blake2b of the file's bytes, read 1 MiB at a time; "" when it cannot be read (decoding will say why)."""
    digest = hashlib.blake2b()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


PILLOW_FORMATS = {"HEIF", "AVIF"}  # OpenCV cannot decode HEIF and ignores the rotation AVIF stores; Pillow does both
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # default of --max-pixels: Pillow's decompression-bomb limit (about 89 megapixels)
MIN_SIDE = 8  # smaller images carry nothing to classify

# OpenCV's own thread pool does not survive fork(): a DataLoader worker forked after the pool ran can hang in
# its first resize. Images are decoded one per worker in parallel instead (detectron2 and mmcv do the same).
cv2.setNumThreads(0)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # its warnings on bad files: ours name the file


def read_image(path: str | Path, min_size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file to an 8-bit RGB array (grayscale, alpha, 16-bit, palette and CMYK included).

    EXIF orientation is applied. Given `min_size`, big JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the result
    still has at least that many pixels a side: several times faster, and nothing is lost after the resize.
    Images over `max_pixels` (default MAX_PIXELS) are refused before they are decoded.
    Raises BadImageError, naming the reason, for files that are not usable images.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever, a device never end
            raise BadImageError("not a regular file (a FIFO, a device or a socket)")
        data = np.fromfile(path, dtype=np.uint8)  # unlike cv2.imread, works with non-ASCII names everywhere
    except OSError as error:
        raise BadImageError(f"cannot be read ({error.strerror or error})") from None
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


def image_software(path: str | Path) -> str | None:
    """None when the file is not an image, judged by its content as Pillow reads headers (whatever its name);
    else the program that wrote it as the image says (a PNG's "Software" text: "Matplotlib version..." on
    this project's plots), "" when it does not say."""
    register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # reads the header and a PNG's text before its pixels
                return str(header.info.get("Software", ""))
    except Image.DecompressionBombError:
        return ""
    except Exception:  # Pillow raises many kinds for what is not an image
        return None


@functools.cache
def register_heif() -> None:
    """Let Pillow open HEIC/HEIF phone photos (pillow-heif applies their rotation); once, at the first decode."""
    import pillow_heif  # imported here: only a decode needs it, and importing it takes a moment
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


def load_image(path: str | Path, img_size: int, max_pixels: int | None = None) -> np.ndarray:
    """The recipe's load_image for any real-world file: read_image, then the recipe's resize."""
    return resize(read_image(path, img_size, max_pixels), img_size)


def loader(max_pixels: int | None):
    """load_image with its pixel limit, as a picklable callable for the recipe's ImageDataset."""
    return functools.partial(load_image, max_pixels=max_pixels)
