"""The ``linear_eval`` scenario: a linear classifier fitted on frozen features.

The shortcuts paper's "Pre-train (Linear eval.)" (Yu et al., 2022, §4, Table 4;
Appendix E: "we first extract the features of all samples and train linear
classifiers on the extracted features. The linear classifiers are trained with the
L-BFGS optimizer for 50 steps"). The features are the backbone's penultimate
outputs (``model.features``) of the (poisoned) training set and the clean test set,
computed once, batched on the device, in eval mode and without gradients; images go
in as floats in [0, 1], so the model's ``Normalize`` layer does any resize (bicubic to
224×224 for the ImageNet extractors of Appendix E). The classifier is the L-BFGS
probe of ``poisonbench.analysis.probe`` with ``kind: linear, steps: 50``.

Features are cached by content (``poisonbench.fitting.features``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from poisonbench.analysis.probe import ProbeParams, fit_lbfgs
from poisonbench.data.imageset import ImageSet
from poisonbench.fitting.features import extract_features
from poisonbench.models.classifier import ImageClassifier

# Appendix E: "The linear classifiers are trained with the L-BFGS optimizer for 50 steps."
LINEAR_EVAL_PROBE = ProbeParams(kind="linear", steps=50)


@dataclass
class LinearEvalResult:
    test_acc: float  # percent, clean test set
    train_acc: float  # percent, the (poisoned) training set the classifier was fitted on
    extract_s: float
    fit_s: float
    cache_hits: int  # of the two feature sets (train, test)


def linear_eval(model: ImageClassifier, train: ImageSet, test: ImageSet, *, seed: int,
                device: str | torch.device = "cpu", probe: ProbeParams = LINEAR_EVAL_PROBE,
                cache: bool = True) -> LinearEvalResult:
    """Fit a linear classifier on ``model``'s features of ``train``; measure it on ``test``."""
    start = time.perf_counter()
    train_features = extract_features(model, train.images, device, cache=cache)
    test_features = extract_features(model, test.images, device, cache=cache)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    classifier = fit_lbfgs(train_features.values, train.labels, train.num_classes, probe, seed, device)
    test_acc = classifier.accuracy(test_features.values, test.labels)
    fit_s = time.perf_counter() - start
    return LinearEvalResult(test_acc=float(test_acc), train_acc=float(classifier.train_acc),
                            extract_s=extract_s, fit_s=fit_s,
                            cache_hits=int(train_features.cached) + int(test_features.cached))
