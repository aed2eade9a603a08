"""A frozen backbone's features: streamed from the image files, kept on disk for the next run.

With the backbone frozen, an image's features depend only on the file, the backbone's weights, the image
size and the normalisation. They are computed once, chunk by chunk as the files decode (memory holds a few
chunks of images, never the dataset), and stored per file, so that a second run with other head settings
(--lr, --epochs, --schedule, --val-size, --seed) skips decoding and the backbone entirely, and a changed or
added file is computed alone.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from MLPipeline.Common import log, progress_reporter, save_atomically
from MLPipeline.CreateDataset import stream_images
from MLPipeline.ResNet_Model import Classifier, forward_in_batches

CACHE_FORMAT = "doc-classifier-features/1"
DECODE_VERSION = 1  # raise when the decode/resize path changes what an image becomes


def file_key(path: str) -> str | None:
    """What identifies a file's content cheaply: absolute path, size and modification time (None if unreadable)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


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
    """The features of every file seen with one backbone fingerprint, in one file under `folder`."""

    def __init__(self, folder: Path, fingerprint: str):
        self.path = Path(folder) / f"features-{fingerprint[:16]}.pt"
        self.fingerprint = fingerprint
        self.rows: dict[str, torch.Tensor] = self.load()
        self.loaded = len(self.rows)  # more rows than this at the end of a run: save()

    def load(self) -> dict[str, torch.Tensor]:
        """The stored features by file key; a damaged or mismatched file is rebuilt, never trusted."""
        if not self.path.exists():
            return {}
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored["format"] != CACHE_FORMAT or stored["fingerprint"] != self.fingerprint:
                raise ValueError("made for another backbone or format")
            if len(stored["keys"]) != len(stored["features"]):
                raise ValueError("keys and features differ in number")
            return dict(zip(stored["keys"], stored["features"]))
        except Exception as error:  # torch raises many kinds for a damaged file
            log.warning("warning: feature cache %s is unusable (%s: %s); computing the features again",
                        self.path, type(error).__name__, str(error).strip().splitlines()[0] if str(error) else "")
            return {}

    def update(self, paths: list[str], positions: list[int], features: torch.Tensor) -> None:
        """Remember the features of paths[position] for each position (rows of `features`, in order)."""
        for position, row in zip(positions, features):
            key = file_key(paths[position])
            if key:
                self.rows[key] = row

    def save(self) -> None:
        """Write every row, atomically. The rows are views into the tensor of features their run computed, and
        torch.save writes each tensor's memory once, so no second copy of the features is made; only when
        over half of what that writes would be rows no key uses any more (files changed since) are the rows
        packed into one new tensor first."""
        keys = list(self.rows)
        rows = [self.rows[key] for key in keys]
        storages = {row.untyped_storage().data_ptr(): row.untyped_storage().nbytes() for row in rows}
        if sum(storages.values()) > 2 * sum(row.nbytes for row in rows):
            rows = list(torch.stack(rows))
        stored = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "keys": keys, "features": rows}
        save_atomically(self.path, lambda temp_name: torch.save(stored, temp_name))


def extract_features(model: Classifier, paths: list[str], img_size: int, device: torch.device, batch_size: int | None,
                     cache: FeatureCache | None, max_pixels: int | None = None,
                     ) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """Features (on the CPU) of the files that decode, in order; returns (features, their positions in
    `paths`, {bad path: reason}). Files in the cache are not read at all; the others stream through the
    backbone as they decode (cache.update() then remembers them)."""
    keys = [file_key(path) for path in paths]
    found = [position for position, key in enumerate(keys) if cache and key in cache.rows]
    to_compute = sorted(set(range(len(paths))) - set(found))
    if cache:
        log.info("features: %d image(s) from the cache (%s), %d to compute", len(found), cache.path,
                 len(to_compute))
    # One tensor filled row by row: the features are held once, never stacked into a second copy.
    features = torch.empty(len(paths), model.head.in_features)
    done_ok = torch.zeros(len(paths), dtype=torch.bool)
    for position in found:
        features[position], done_ok[position] = cache.rows[keys[position]], True
    skipped, done = {}, 0
    update = progress_reporter("features", len(to_compute))
    model.eval()
    for chunk in stream_images([paths[position] for position in to_compute], img_size, max_pixels=max_pixels):
        rows = [to_compute[position] for position in chunk.positions]
        if rows:
            features[rows] = forward_in_batches(model.features, chunk.images, device, batch_size).float().cpu()
            done_ok[rows] = True
        skipped.update(chunk.skipped)
        done += len(chunk.positions) + len(chunk.skipped)
        update(done)
    positions = done_ok.nonzero().flatten().tolist()
    return (features if len(positions) == len(paths) else features[done_ok]), positions, skipped
