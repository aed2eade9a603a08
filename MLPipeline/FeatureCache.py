"""A frozen backbone's features, kept on disk for the next run.

With the backbone frozen, an image's features depend only on the file, the backbone's weights, the image
size and the normalisation. They are stored per file, so that a second run with other head settings
(--lr, --epochs, --schedule, --val-size, --seed) skips decoding and the backbone entirely, and a changed or
added file is computed alone. The recipe hands `cached` its own function that computes features, and gets
back one that computes only what the cache lacks.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from MLPipeline.Common import atomic_write, log

CACHE_FORMAT = "doc-classifier-features/4"
DECODE_VERSION = 1  # raise when the decode/resize path changes what an image becomes
KEY_BYTES = 16


def file_key(path: str) -> bytes | None:
    """What identifies a file's content cheaply: a 16-byte hash of its absolute path, size and modification
    time (None if unreadable). One is held per file, so it is small: the path alone is often over 100 bytes."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    identity = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.blake2b(os.fsencode(identity), digest_size=KEY_BYTES).digest()


def backbone_fingerprint(model: nn.Module, arch: str, img_size: int) -> str:
    """A hash of everything besides the file that determines its features: the backbone's weights themselves
    (two weights files of the same name must not share a cache), architecture, image size, mean/std, the
    decode path's version and torch's (its kernels may round differently)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([arch, img_size, model.mean, model.std, DECODE_VERSION, torch.__version__]).encode())
    return digest.hexdigest()


class FeatureCache:
    """The features of every file seen with one backbone fingerprint, in one file under `folder`.

    In memory, the feature tensors as the runs computed them (`blocks`), their rows numbered on from one
    block to the next (`starts`: each block's first number), and per file key its row's number (`rows`):
    no object per row but an int (a tensor view costs about 650 bytes, a ResNet18 row of features 2 KB),
    and no second copy of a run's features: its block is the tensor it trains on. On disk, the keys are
    one N x 16 byte tensor and the numbers one tensor: no Python object per file is pickled.
    """

    def __init__(self, folder: Path, fingerprint: str, width: int | None = None):
        self.path = Path(folder) / f"features-{fingerprint[:16]}.pt"
        self.fingerprint, self.width = fingerprint, width
        self.blocks: list[torch.Tensor] = []
        self.starts: list[int] = []
        self.rows: dict[bytes, int] = {}
        self.load()
        self.loaded = len(self.rows)  # more rows than this at the end of a run: save()

    def __contains__(self, key: bytes | None) -> bool:
        return key in self.rows

    def __getitem__(self, key: bytes) -> torch.Tensor:
        row = self.rows[key]
        block = bisect.bisect_right(self.starts, row) - 1
        return self.blocks[block][row - self.starts[block]]

    def load(self) -> None:
        """The stored features and where each file's row is; a damaged or mismatched file is rebuilt, never trusted."""
        if not self.path.exists():
            return
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored["format"] != CACHE_FORMAT or stored["fingerprint"] != self.fingerprint:
                raise ValueError("made for another backbone or format")
            blocks, keys, rows = stored["blocks"], stored["keys"], stored["rows"]
            total = sum(len(block) for block in blocks)
            if keys.shape != (len(rows), KEY_BYTES) or not ((rows >= 0) & (rows < total)).all():
                raise ValueError("keys and features do not match")
            if any(block.ndim != 2 or block.shape[1] != (self.width or block.shape[1]) or not block.isfinite().all()
                   for block in blocks):
                raise ValueError(f"features are not finite rows of the backbone's width {self.width}")
            raw = keys.numpy().tobytes()
            self.blocks, self.starts = blocks, first_rows(blocks)
            self.rows = dict(zip((raw[at:at + KEY_BYTES] for at in range(0, len(raw), KEY_BYTES)), rows.tolist()))
        except Exception as error:  # torch raises many kinds for a damaged file
            log.warning("warning: feature cache %s is unusable (%s: %s); computing the features again",
                        self.path, type(error).__name__, str(error).strip().splitlines()[0] if str(error) else "")

    def update(self, paths: list[str], positions: list[int], features: torch.Tensor) -> None:
        """Remember the features of paths[position] for each position (rows of `features`, in order)."""
        start = self.starts[-1] + len(self.blocks[-1]) if self.blocks else 0
        self.blocks.append(features)
        self.starts.append(start)
        for row, position in enumerate(positions):
            key = file_key(paths[position])
            if key:
                self.rows[key] = start + row

    def placed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every file's row number, and the block each is in."""
        rows = torch.tensor(list(self.rows.values()), dtype=torch.int64)
        return rows, torch.bucketize(rows, torch.tensor(self.starts, dtype=torch.int64), right=True) - 1

    def save(self) -> None:
        """Write every file's row, atomically, in the blocks they are in: no copy of the features is made.
        Blocks no file uses are left out; when over half of the rows written would be rows no file uses any
        more (files changed since), the used rows are packed into one block first."""
        rows, block_of = self.placed_rows()
        if sum(len(self.blocks[block]) for block in block_of.unique().tolist()) > 2 * len(self.rows):
            self.blocks, self.starts = [torch.stack([self[key] for key in self.rows])], [0]
            self.rows = {key: row for row, key in enumerate(self.rows)}
            rows, block_of = self.placed_rows()
        used = block_of.unique().tolist()
        kept = [self.blocks[block] for block in used]
        new_starts = torch.zeros(len(self.blocks), dtype=torch.int64)  # where each kept block starts, written
        new_starts[used] = torch.tensor(first_rows(kept), dtype=torch.int64)
        keys = torch.from_numpy(np.frombuffer(b"".join(self.rows), np.uint8).reshape(-1, KEY_BYTES).copy())
        stored = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "keys": keys, "blocks": kept,
                  "rows": rows - torch.tensor(self.starts, dtype=torch.int64)[block_of] + new_starts[block_of]}
        with atomic_write(self.path) as temp_name:
            torch.save(stored, temp_name)


def first_rows(blocks: list[torch.Tensor]) -> list[int]:
    """The number of each block's first row, rows being numbered on from one block to the next."""
    return list(itertools.accumulate((len(block) for block in blocks[:-1]), initial=0))[:len(blocks)]


Features = Callable[[list[str]], tuple[torch.Tensor, list[int], dict[str, str]]]


def cached(compute: Features, cache_dir: Path, fingerprint: str, width: int) -> Features:
    """`compute(paths) -> (features of the files that decode, their positions in paths, {path: why not})`,
    answered from the cache where it can: the files it holds are not read at all, the others are computed
    in one call and remembered. `.save()` on the function returned writes the cache, if anything was added.
    width: the backbone's, which every stored row must have (a damaged file is computed again)."""
    cache = FeatureCache(cache_dir, fingerprint, width)

    def cached_compute(paths: list[str]) -> tuple[torch.Tensor, list[int], dict[str, str]]:
        keys = [file_key(path) for path in paths]
        missing = [position for position, key in enumerate(keys) if key not in cache]
        log.info("features: %d image(s) from the cache (%s), %d to compute", len(paths) - len(missing), cache.path,
                 len(missing))
        computed, computed_positions, failed = compute([paths[position] for position in missing])
        computed_positions = [missing[position] for position in computed_positions]
        if computed_positions:
            cache.update(paths, computed_positions, computed)
        if len(missing) == len(paths):  # nothing came from the cache: no second copy of the features
            return computed, computed_positions, failed
        positions = [position for position, key in enumerate(keys) if key in cache and paths[position] not in failed]
        return torch.stack([cache[keys[position]] for position in positions]), positions, failed
    cached_compute.cache = cache  # for tests and benchmarks that look inside
    cached_compute.save = lambda: cache.save() if len(cache.rows) > cache.loaded else None
    return cached_compute
