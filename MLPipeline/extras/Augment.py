"""Train-time augmentation for photographed documents: the recipe puts an Augmenter in front of the model; in
training mode it transforms each training batch, on the batch's device, and in eval mode (scoring) it passes
the images through unchanged.

Crops (75-100% of the area, aspect 0.85-1.18), rotations of up to 8 degrees, perspective (half the images)
and changes of brightness, contrast and saturation (+-30%) are what real photos of a card vary in; flips are
off unless asked for, since mirrored text never occurs in a real photo. Hand-written rather than
torchvision's transforms v2 because it draws a new transform for every image yet runs on the whole batch at
once: one grid_sample for the geometry, one linear colour map per image (benchmarks/bench_augment.py
measures both side by side).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Augmenter(nn.Module):
    """make_augmenter's transforms as the first layer of a network: applied in training mode only."""

    def __init__(self, img_size: int, flips: bool = False):
        super().__init__()
        self.augment = make_augmenter(img_size, flips)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.augment(images) if self.training else images


def make_augmenter(img_size: int, flips: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of N x 3 x S x S images in [0, 1] (any device) -> the same, each randomly transformed."""
    # Each output pixel's position in [-1, 1], as homogeneous (x, y, 1): where the homographies send it.
    positions = F.affine_grid(torch.eye(2, 3)[None], [1, 3, img_size, img_size], align_corners=False).view(-1, 2)
    positions = torch.cat([positions, torch.ones(len(positions), 1)], 1)

    def augment(images: torch.Tensor) -> torch.Tensor:
        count, device = len(images), images.device
        homographies = random_homographies(count, flips).to(device)
        points = torch.einsum("njk,pk->npj", homographies, positions.to(device))  # count x pixels x 3
        grid = (points[..., :2] / points[..., 2:]).view(count, img_size, img_size, 2)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return jitter_colours(warped).clamp_(0, 1)
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
    count, luma = len(pixels), torch.tensor([0.299, 0.587, 0.114], device=pixels.device)
    brightness, contrast, saturation = (uniform(count, 0.7, 1.3).view(count, 1, 1).to(pixels.device)
                                        for _ in range(3))
    colours = contrast * brightness * (saturation * torch.eye(3, device=pixels.device) + (1 - saturation) * luma)
    offset = (1 - contrast) * brightness * (pixels.mean((2, 3)) @ luma).view(count, 1, 1)
    return torch.baddbmm(offset, colours, pixels.flatten(2)).view_as(pixels)
