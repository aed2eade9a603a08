"""--unfreeze: train the backbone's last stage (layer4 on ResNets) or all of it beside the head.

The recipe's model is frozen; unfreeze() lets gradients into the chosen layers (BatchNorm keeps its
pretrained statistics: the recipe's Classifier.train keeps it in eval mode), and optimizer_for gives those
layers their own, smaller learning rate.
"""
from __future__ import annotations

import torch
from torch import nn

from MLPipeline.ResNet_Model import Classifier
from MLPipeline.extras.Run import UNFREEZE_CHOICES  # noqa: F401 (re-exported)


def unfreeze(model: Classifier, which: str) -> Classifier:
    """Let gradients into the backbone's last stage ('last'), all of it ('all'), or none of it ('none')."""
    model.backbone.requires_grad_(which == "all")
    if which == "last":
        last_stage(model.backbone).requires_grad_(True)
    return model


def last_stage(backbone: nn.Module) -> nn.Module:
    """The final stage of a backbone: layer4 of a ResNet, the last block stage and head conv of a timm
    EfficientNet, else the last block of `.features` with weights."""
    if hasattr(backbone, "layer4"):
        return backbone.layer4
    if hasattr(backbone, "blocks"):
        return nn.ModuleList([backbone.blocks[-1], backbone.conv_head, backbone.bn2])
    return [block for block in backbone.features if any(True for _ in block.parameters())][-1]


def optimizer_for(model: Classifier, lr: float, backbone_lr: float | None = None) -> torch.optim.Adam:
    """Adam for the head at lr and, when layers of the backbone are unfrozen, for them at backbone_lr (by
    default lr / 10: pretrained layers need only small steps)."""
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    return torch.optim.Adam([{"params": model.head.parameters(), "lr": lr},
                             {"params": backbone_parameters, "lr": backbone_lr or lr / 10}])
