"""Any timm architecture as a poisonbench backbone, with weights only from a local file.

Wightman, "PyTorch Image Models" (timm), https://github.com/huggingface/pytorch-image-models.
This is how the shortcuts paper's defense by pre-trained feature extractors
(Section 4, Table 7: a SimCLR ResNet-152 fine-tuned, or frozen with a linear
read-out) is expressed: ``model: timm:<arch>`` with ``weights: <local file>`` and
``image_size: 224``, since that paper resizes CIFAR-10 with bicubic upsampling to
224×224 before the extractor (Appendix E). The resize is done by the model's
``normalize`` layer, so data and attacks stay at 32×32 in pixel space.

timm is always called with ``pretrained=False`` here: weights come only from the
local file ``weights`` (see ``poisonbench.models.weights``). Published timm weights
become such a file through ``poisonbench.models.hub`` when a config asks for them. The timm model is
built headless (``num_classes=0``), so it returns pooled pre-logit features, and
poisonbench's own ``head`` is the classifier.

Normalization defaults to CIFAR-10 like every model; ImageNet-pre-trained weights
usually want ``mean: imagenet`` and ``std: imagenet``.
"""
from __future__ import annotations

import difflib

from torch import nn

from poisonbench.errors import UnknownNameError
from poisonbench.models.classifier import ImageClassifier, Stats
from poisonbench.models.factory import MODELS
from poisonbench.models.weights import load_weights


def timm_backbone(arch: str) -> tuple[nn.Module, int]:
    """The headless timm model ``arch`` (random init) and the width of its features."""
    import timm  # here, not at the top: it costs ~2 s, and most runs never build one

    if not isinstance(arch, str) or not timm.is_model(arch):
        close = difflib.get_close_matches(str(arch), timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(f"unknown timm architecture {arch!r}{hint}")
    backbone = timm.create_model(arch, pretrained=False, num_classes=0)
    # Models with a pre-logits layer (e.g. MobileNetV3) return head_hidden_size
    # features when headless; num_features is the width before that layer.
    feature_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return backbone, int(feature_dim)


@MODELS.register("timm")
def timm_model(
    num_classes: int,
    *,
    arch: str,
    weights: str | None = None,
    image_size: int | None = None,
    mean: Stats = None,
    std: Stats = None,
) -> ImageClassifier:
    """timm architecture ``arch``; optional local ``weights`` and bicubic resize to ``image_size``."""
    backbone, feature_dim = timm_backbone(arch)
    model = ImageClassifier(backbone, feature_dim, num_classes, mean=mean, std=std, image_size=image_size)
    return load_weights(model, weights) if weights is not None else model
