"""A frozen backbone's features: streamed from the image files, kept on disk for the next run.

With the backbone frozen, an image's features depend only on the file, the backbone's weights, the image
size and the normalisation. They are computed once, chunk by chunk as the files decode (memory holds a few
chunks of images, never the dataset), and stored per file, so that a second run with other head settings
(--lr, --epochs, --schedule, --val-size, --seed) skips decoding and the backbone entirely, and a changed or
added file is computed alone.
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

from MLPipeline.Common import log, progress_reporter, save_atomically
from MLPipeline.CreateDataset import stream_images
from MLPipeline.ResNet_Model import Classifier, forward_in_batches

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


def backbone_fingerprint(model: Classifier, arch: str, img_size: int) -> str:
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

    def __init__(self, folder: Path, fingerprint: str):
        self.path = Path(folder) / f"features-{fingerprint[:16]}.pt"
        self.fingerprint = fingerprint
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
        save_atomically(self.path, lambda temp_name: torch.save(stored, temp_name))


def first_rows(blocks: list[torch.Tensor]) -> list[int]:
    """The number of each block's first row, rows being numbered on from one block to the next."""
    return list(itertools.accumulate((len(block) for block in blocks[:-1]), initial=0))[:len(blocks)]


def extract_features(model: Classifier, paths: list[str], img_size: int, device: torch.device, batch_size: int | None,
                     cache: FeatureCache | None, max_pixels: int | None = None,
                     network: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """Features (on the CPU) of the files that decode, in order; returns (features, their positions in
    `paths`, {bad path: reason}). Files in the cache are not read at all; the others stream through the
    backbone as they decode (cache.update() then remembers them). network: what computes the features
    (default model.features; training passes its FrozenBackbone)."""
    keys = [file_key(path) for path in paths]
    found = [position for position, key in enumerate(keys) if cache and key in cache]
    to_compute = [position for position, key in enumerate(keys) if not (cache and key in cache)]
    if cache:
        log.info("features: %d image(s) from the cache (%s), %d to compute", len(found), cache.path,
                 len(to_compute))
    # One tensor filled row by row: the features are held once, never stacked into a second copy.
    features = torch.empty(len(paths), model.head.in_features)
    done_ok = torch.zeros(len(paths), dtype=torch.bool)
    for position in found:
        features[position], done_ok[position] = cache[keys[position]], True
    skipped, done = {}, 0
    update = progress_reporter("features", len(to_compute))
    model.eval()
    for chunk in stream_images([paths[position] for position in to_compute], img_size, max_pixels=max_pixels):
        rows = [to_compute[position] for position in chunk.positions]
        if rows:
            features[rows] = forward_in_batches(network or model.features, chunk.images, device,
                                                batch_size).float().cpu()
            done_ok[rows] = True
        skipped.update(chunk.skipped)
        done += len(chunk.positions) + len(chunk.skipped)
        update(done)
    positions = done_ok.nonzero().flatten().tolist()
    return (features if len(positions) == len(paths) else features[done_ok]), positions, skipped
