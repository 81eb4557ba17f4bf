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
  ``weights_only=True``), in either layout that
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

- ``download: true``: when the file is missing, fetch the published weights of the timm
  ``model`` (``timm:resnet50.a1_in1k``) into it (``poisonbench.models.hub``; needs
  network once, the only download of weights poisonbench makes).
- ``pretrain``: when the file is missing, pre-train it first with ``poisonbench
  pretrain``'s code (``poisonbench.pretrain.run.pretrain``), e.g. ``{method: simclr}``;
  the backbone is the defense's ``model`` or else the job's own model, on the
  auxiliary data of ``dataset`` (default the job's dataset; digits: its disjoint
  ``aux`` split), with the optional ``epochs``, ``batch_size`` and ``seed`` (0). The
  cpu profile uses it, so a fresh machine runs the defense tables with no step first.
  Parallel jobs that find the file missing at once pre-train it once: the first holds
  an flock on ``<file>.lock`` while it trains, the others wait and then read its file.
  A pre-training killed part of the way continues from ``<file>.partial/`` next time.
- Under ``fast_dev_run`` a missing file is not an error and nothing is fetched or
  pre-trained: the smoke run keeps the freshly initialised backbone (same code path,
  one batch), and ``result.json`` says so (``weights_sha256: null``).

A file that does not fit the backbone fails with a ``ConfigError`` that names the
count and the first of the missing or unexpected keys (or the first shape mismatch).
The job config holds the path, not the file: ``result.json`` records the file's
sha256 next to it, so a backbone overwritten under the same name is visible.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from poisonbench.defenses.base import Defense, register_defense
from poisonbench.errors import ConfigError
from poisonbench.files import home
from poisonbench.models import build_model
from poisonbench.models.classifier import ImageClassifier
from poisonbench.models.weights import load_weights


PRETRAIN_KEYS = ("method", "dataset", "epochs", "batch_size", "seed")


@dataclass(frozen=True)
class PretrainedParams:
    weights: str  # local weights file; relative paths are under the poisonbench home
    model: str | None = None  # backbone architecture when it is not the job's model
    model_params: dict = field(default_factory=dict)  # its build_model parameters
    download: bool = False  # fetch a timm model's published weights when the file is missing
    pretrain: dict | None = None  # pre-train the file when missing: {method, dataset, epochs, batch_size, seed}

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ValueError(f"weights must be the path of a local weights file, got {self.weights!r}")
        if not isinstance(self.download, bool):
            raise ValueError(f"download must be true or false, got {self.download!r}")
        if self.pretrain is not None:
            if not isinstance(self.pretrain, dict) or "method" not in self.pretrain:
                raise ValueError(f"pretrain must be a mapping with a method (simclr or supervised), got {self.pretrain!r}")
            unknown = sorted(set(self.pretrain) - set(PRETRAIN_KEYS))
            if unknown:
                raise ValueError(f"unknown pretrain key {unknown[0]!r}; allowed: {', '.join(PRETRAIN_KEYS)}")
            object.__setattr__(self, "pretrain", dict(self.pretrain))
        if self.download and self.pretrain is not None:
            raise ValueError("give download or pretrain, not both: they are two ways to make the same file")
        if self.download and not str(self.model or "").startswith("timm:"):
            raise ValueError(f"download needs model: timm:<arch>[.<tag>] (the weights timm publishes), got {self.model!r}")
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

    def prepare_model(self, model: ImageClassifier, num_classes: int, *, config: Mapping | None = None,
                      data_root: str | None = None) -> ImageClassifier:
        config = config or {}
        if self.params.model is not None:
            model = build_model(self.params.model, num_classes, **self.params.model_params)
        path = self.weights_path
        if not path.is_file():
            if config.get("fast_dev_run"):
                return model  # a smoke run: the same path with a fresh backbone (module docstring)
            if self.params.download:
                from poisonbench.models.hub import fetch_timm_weights

                fetch_timm_weights(self.params.model, path)
            elif self.params.pretrain is not None:
                self._pretrain(path, config, data_root)
        return load_weights(model, path)  # ConfigError naming keys on a mismatch, or a missing file

    def _pretrain(self, path: Path, config: Mapping, data_root: str | None) -> None:
        from poisonbench.pretrain.run import pretrain

        recipe = self.params.pretrain
        if self.params.model is not None:
            model, model_params = self.params.model, self.params.model_params
        elif "model" in config:
            model, model_params = config["model"], dict(config.get("model_params") or {})
        else:
            raise ConfigError("pretrain needs the backbone's architecture: give the defense a model, or run it in a job")
        dataset = recipe.get("dataset") or config.get("dataset")
        if dataset is None:
            raise ConfigError("pretrain needs the dataset to defend: give pretrain a dataset, or run it in a job")
        pretrain(recipe["method"], dataset, model=model, model_params=model_params, epochs=recipe.get("epochs"),
                 batch_size=recipe.get("batch_size"), seed=int(recipe.get("seed", 0)), out=path,
                 data_root=data_root, if_missing=True)

    def describe(self) -> dict:
        path = self.weights_path
        return {**super().describe(), "weights_path": str(path),
                "weights_sha256": file_sha256(path) if path.is_file() else None}
