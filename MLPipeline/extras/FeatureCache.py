"""A frozen backbone's features, kept on disk for the next run.

With the backbone frozen, an image's features depend only on the file's bytes and on what turns bytes into
features: the backbone's weights, the image size, the normalisation, the pixel limit, the decode path. The
first make the key of each file (a digest of its content: an image edited in place, its size and time kept,
is a new key); the rest make the fingerprint in the cache file's name. A second run with other head
settings (--lr, --epochs, --seed, --val-size, ...) reads no image and runs no backbone; a changed or added
file is computed alone. The file holds the features of the files the last run read, as one tensor.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from MLPipeline.extras.Common import UserError, atomic_write, first_line, log, safe_torch_load
from MLPipeline.extras.Files import file_digest, file_size

CACHE_FORMAT = "doc-classifier-features/5"
DECODE_VERSION = 1  # raise when the decode/resize path changes what an image becomes


@dataclass
class FeatureCache:
    """The features of files by their content key, for one fingerprint: rows[key] is the key's row of features."""
    path: Path
    fingerprint: str
    rows: dict[str, int]
    features: torch.Tensor


def content_key(path: str) -> str:
    """A digest of the file's bytes; "" for what cannot be read or is no regular file (decoding says why)."""
    return file_digest(path) if file_size(path) >= 0 else ""


def fingerprint(model: nn.Module, arch: str, img_size: int, max_pixels: int, bf16: bool = False) -> str:
    """A hash of everything besides the file that decides its features: the backbone's weights (two weights
    files of the same name must not share a cache), architecture, image size, mean/std, the pixel limit
    (a file over it is skipped, never cached), the decode path's version, torch's (its kernels round) and
    whether the backbone ran in bfloat16."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([arch, img_size, model.mean, model.std, max_pixels, DECODE_VERSION,
                              torch.__version__, bf16]).encode())
    return digest.hexdigest()


def load_cache(folder: Path, fingerprint: str, width: int) -> FeatureCache:
    """The cache of this fingerprint under `folder`: empty when there is none; a damaged or mismatched file
    (its zip CRCs, its format, its shapes) is named in a warning and computed again, never trusted."""
    path = Path(folder) / f"features-{fingerprint[:16]}.pt"
    empty = FeatureCache(path, fingerprint, {}, torch.zeros(0, width))
    if not path.exists():
        return empty
    try:
        stored = safe_torch_load(path, "feature cache")
        keys, rows, features = stored["keys"], stored["rows"], stored["features"]
        if stored["format"] != CACHE_FORMAT or stored["fingerprint"] != fingerprint:
            raise ValueError("made for another backbone or format")
        if features.dtype != torch.float32 or features.ndim != 2 or features.shape[1] != width or not features.isfinite().all():
            raise ValueError(f"its features are not finite float32 rows of the backbone's width {width}")
        if len(rows) != len(keys) or not all(0 <= row < len(features) for row in rows):
            raise ValueError("its keys and rows do not match")
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as error:
        log.warning("warning: feature cache %s is unusable (%s); computing the features again", path,
                    first_line(error))
        return empty
    return FeatureCache(path, fingerprint, dict(zip(keys, rows)), features)


def save_cache(cache: FeatureCache) -> None:
    """Write the cache atomically; a folder that cannot be written costs the next run time, not this run."""
    keys = list(cache.rows)  # files with the same bytes share a key: fewer keys than rows, then
    for leftover in cache.path.parent.glob(f".{cache.path.name}.*.tmp"):  # a run killed while writing it
        leftover.unlink(missing_ok=True)
    try:
        with atomic_write(cache.path) as temp_name:
            torch.save({"format": CACHE_FORMAT, "fingerprint": cache.fingerprint, "keys": keys,
                        "rows": [cache.rows[key] for key in keys], "features": cache.features}, temp_name)
    except (OSError, UserError) as error:
        log.warning("warning: the feature cache was not saved (%s); the next run computes the features again",
                    first_line(error))
