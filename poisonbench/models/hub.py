"""Fetching a timm model's published pre-trained weights into a local safetensors file.

The only place poisonbench downloads weights, and only when a config asks for it
(the ``pretrained`` defense's ``download: true``) and the file is not there yet. timm
(``pretrained=True``) fetches the weights from the Hugging Face Hub into its own
cache; they are then written once as a bare timm backbone state dict (the layout
``poisonbench.models.weights`` accepts) to the file the job names, so every later
job reads the same local bytes, and ``result.json`` records their sha256. A machine
without network (a cluster's compute node) gets one sentence saying where to put the
file instead.

The architecture names a pretrained tag as timm does, e.g. ``resnet50.a1_in1k``;
without a tag timm picks its default weights for the architecture.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from poisonbench import files
from poisonbench.errors import ConfigError
from poisonbench.models.factory import TIMM_PREFIX


def timm_arch(model: str | None) -> str:
    """``resnet50.a1_in1k`` from ``timm:resnet50.a1_in1k``; anything else is a ConfigError."""
    if not isinstance(model, str) or not model.startswith(TIMM_PREFIX) or len(model) == len(TIMM_PREFIX):
        raise ConfigError(f"downloading weights needs a timm model such as 'timm:resnet50.a1_in1k', got {model!r}")
    return model[len(TIMM_PREFIX):]


def fetch_timm_weights(model: str, path: str | Path) -> Path:
    """Download timm ``model``'s pre-trained weights and write them to ``path`` atomically."""
    import timm  # here: importing it costs seconds and most runs never need it

    arch, path = timm_arch(model), Path(path)
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm architecture {arch!r}")
    try:
        net = timm.create_model(arch, pretrained=True)
    except Exception as error:  # network, hub and cache errors all mean the same to a user
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"cannot download the pre-trained weights of timm model {arch!r} ({reason[:160]}); on a machine "
            f"without network, fetch them where there is one and copy the file to {str(path)!r}"
        ) from None
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "timm-backbone/1", "source": "timm pretrained (Hugging Face Hub)", "arch": arch,
            "pretrained_cfg": json.dumps(getattr(net, "pretrained_cfg", {}) or {}, sort_keys=True, default=str),
            "timm_version": timm.__version__, "torch_version": torch.__version__}
    with files.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path
