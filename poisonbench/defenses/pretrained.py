"""``pretrained``: a pre-trained feature extractor in place of a freshly initialised backbone.

The shortcuts paper's defense (Yu et al., 2022, §4, Table 4 "Pre-train" and
"Pre-train (Linear eval.)"): a backbone pre-trained on other data (there a ResNet-152
trained with SimCLR on unlabelled ImageNet) recognises features of the target task
and so does not need the poison's shortcuts. The defense only replaces the network;
what is trained on top is the scenario's business:

- ``finetune`` re-initialises the classifier and trains every layer with the
  profile's recipe (Table 4 "Pre-train"; Appendix E: "the same hyperparameters as
  Section 3");
- ``linear_eval`` extracts the features once and fits a linear classifier with
  L-BFGS for 50 steps (Table 4 "Pre-train (Linear eval.)"; Appendix E);
- ``transfer`` trains the re-initialised linear layer with the profile's optimiser.

Parameters:

- ``weights``: a local ``.safetensors`` file or PyTorch state dict (read with
  ``weights_only=True``; nothing is downloaded), in either layout that
  ``poisonbench.models.weights`` accepts (a poisonbench ``model.state_dict()`` or a
  bare timm backbone). A relative path is taken relative to the poisonbench home
  (``$POISONBENCH_HOME``, default ``~/.cache/poisonbench``), never to the working
  directory, because a job is a function of its config wherever it runs: pretraining
  writes its backbones to ``<home>/backbones/<name>.safetensors``, and a config says
  ``weights: backbones/digits_simclr_small_cnn.safetensors``.
- ``model`` / ``model_params``: the architecture of the backbone when it differs from
  the job's victim (``model: timm:resnet152, model_params: {image_size: 224, mean:
  imagenet, std: imagenet}`` for an ImageNet extractor on CIFAR-10, which Appendix E
  upsamples to 224×224 with bicubic interpolation); left out, the weights go into
  the victim model the job built.

A file that does not fit the backbone fails with a ``ConfigError`` that names the
count and the first of the missing or unexpected keys (or the first shape mismatch).
The job config holds the path, not the file: ``result.json`` records the file's
sha256 next to it, so a backbone overwritten under the same name is visible.
``write_fixture_weights`` puts a random backbone where a job expects its file, for
smoke runs and tests on an isolated home (as ``poisonbench.data.fixtures`` does for data).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from poisonbench.defenses.base import Defense, register_defense
from poisonbench.files import atomic_path, home
from poisonbench.models import build_model
from poisonbench.models.classifier import ImageClassifier
from poisonbench.models.weights import load_weights


@dataclass(frozen=True)
class PretrainedParams:
    weights: str  # local weights file; relative paths are under the poisonbench home
    model: str | None = None  # backbone architecture when it is not the job's model
    model_params: dict = field(default_factory=dict)  # its build_model parameters

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ValueError(f"weights must be the path of a local weights file, got {self.weights!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a model name such as 'timm:resnet18', got {self.model!r}")
        if not isinstance(self.model_params, dict):
            raise ValueError(f"model_params must be a mapping, got {self.model_params!r}")
        if self.model_params and self.model is None:
            raise ValueError("model_params needs model (the architecture they are parameters of); "
                             "to change the victim's own parameters use the job's model_params")
        object.__setattr__(self, "model_params", dict(self.model_params))


def resolve_weights(path: str) -> Path:
    """``path`` as a file: absolute (or ``~``) as given, relative under ``poisonbench.files.home()``."""
    given = Path(path).expanduser()
    return given if given.is_absolute() else home() / given


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@register_defense("pretrained", PretrainedParams)
class Pretrained(Defense):
    """The backbone comes from ``weights`` (see the module docstring)."""

    @property
    def weights_path(self) -> Path:
        return resolve_weights(self.params.weights)

    def prepare_model(self, model: ImageClassifier, num_classes: int) -> ImageClassifier:
        if self.params.model is not None:
            model = build_model(self.params.model, num_classes, **self.params.model_params)
        return load_weights(model, self.weights_path)  # ConfigError naming keys on a mismatch

    def describe(self) -> dict:
        path = self.weights_path
        return {**super().describe(), "weights_path": str(path),
                "weights_sha256": file_sha256(path) if path.is_file() else None}



def write_fixture_weights(config: Mapping, num_classes: int = 10, seed: int = 0) -> Path | None:
    """For smoke runs and tests only: a randomly initialised backbone written where the
    job ``config``'s ``pretrained`` defense expects its weights, when no file is there.
    ``num_classes`` only shapes the saved head, which a model of another size skips.

    Returns the path written, or ``None`` (another defense, or the file exists). Never
    call it on a real poisonbench home: a later real run would load the random weights.
    """
    if config.get("defense") != "pretrained":
        return None
    defense = Pretrained(config.get("defense_params"))
    path = defense.weights_path
    if path.exists():
        return None
    torch.manual_seed(seed)
    if defense.params.model is not None:
        model = build_model(defense.params.model, num_classes, **defense.params.model_params)
    else:
        model = build_model(config["model"], num_classes, **dict(config.get("model_params") or {}))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return path
