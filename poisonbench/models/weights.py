"""Loading a local weights file into an ImageClassifier (nothing is ever downloaded).

Two layouts are accepted, because both occur in practice:
- a poisonbench state dict (``model.state_dict()``: keys ``backbone.*`` and ``head.*``,
  possibly under a wrapper prefix such as Lightning's ``model.`` or DDP's ``module.``,
  possibly nested under a checkpoint's ``"state_dict"``);
- a bare backbone state dict, e.g. a timm / Hugging Face ``model.safetensors``: keys of
  the backbone itself, plus the original classifier, which is dropped unless its shape
  fits this model's head.
The backbone must match exactly (no missing key, no stray key). The head is loaded
when its shape fits and otherwise keeps its fresh initialisation, as the fine-tune
and transfer scenarios re-initialise it anyway (robuster, Appendix A).

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``, never with
unrestricted pickle (DESIGN.md, "No pickle").
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from poisonbench.errors import ConfigError

from poisonbench.models.classifier import ImageClassifier

_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local ``.safetensors`` or PyTorch state-dict file, on the CPU."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"model weights file {str(file)!r} does not exist; give a local .safetensors or PyTorch "
            "state-dict file, or let the pretrained defense make it (download: true for a timm model's "
            "published weights, or pretrain: {method: simclr})"
        )
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure is a bad file, reported as such
        raise ConfigError(f"cannot read model weights from {str(file)!r}: {error}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # Lightning / common training checkpoints
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"model weights file {str(file)!r} does not hold a state dict of named tensors")
    return dict(state)


def _classifier_keys(backbone: torch.nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier a bare timm state dict carries (e.g. ``fc``, ``head.fc``)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, bool]:
    """(backbone part, head part, whether the file is in poisonbench layout)."""
    prefixes = set()
    for key in state:
        at = key.find("backbone.")
        if at == 0 or (at > 0 and key[at - 1] == "."):
            prefixes.add(key[:at])
    for prefix in sorted(prefixes, key=len):
        # Under the prefix there must be nothing but an ImageClassifier's parts; other
        # keys of a training checkpoint (a defense's modules, say) are ignored.
        under = [k[len(prefix):] for k in state if k.startswith(prefix)]
        if all(k.split(".", 1)[0] in ("backbone", "head", "normalize") for k in under):
            def part(name: str) -> dict:
                start = prefix + name + "."
                return {k[len(start):]: v for k, v in state.items() if k.startswith(start)}

            return part("backbone"), part("head"), True
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, {}, False


def load_weights(model: ImageClassifier, path: str | Path) -> ImageClassifier:
    """Load ``path`` into ``model`` in place (see the module docstring); returns the model."""
    file = str(Path(path).expanduser())
    backbone_state, head_state, ours = _split(read_state_dict(path))
    expected = set(model.backbone.state_dict())
    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it).
    missing = sorted(k for k in expected - set(backbone_state) if not k.endswith("num_batches_tracked"))
    extra = sorted(set(backbone_state) - expected)
    if not ours:
        # A bare backbone file still carries its original classifier: keep it aside
        # for the head when it fits, never count it as a mismatch.
        for name in _classifier_keys(model.backbone):
            for leaf in ("weight", "bias"):
                key = f"{name}.{leaf}"
                if key in backbone_state:
                    head_state[leaf] = backbone_state[key]
        extra = [k for k in extra if not any(k.startswith(c + ".") for c in _classifier_keys(model.backbone))]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"{len(missing)} backbone keys are missing (e.g. {missing[0]!r})")
        if extra:
            detail.append(f"{len(extra)} keys are unknown to the backbone (e.g. {extra[0]!r})")
        raise ConfigError(f"model weights file {file!r} does not fit this model: {' and '.join(detail)}")
    backbone_state = {k: v for k, v in backbone_state.items() if k in expected}
    try:
        model.backbone.load_state_dict(backbone_state, strict=True)
    except RuntimeError as error:  # shape mismatches
        first = str(error).strip().splitlines()[-1].strip()
        raise ConfigError(f"model weights file {file!r} does not fit this model: {first}") from None
    head = model.head.state_dict()
    if set(head_state) == set(head) and all(head_state[k].shape == head[k].shape for k in head):
        model.head.load_state_dict(head_state)
    return model
