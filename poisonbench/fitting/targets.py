"""Measuring integrity poisoning on a trained victim (robuster App. C.1): whether its
target reads as the adversarial class, and its accuracy on the rest of the test set.

- ``poison_success``: 100 when the (single) target image is classified as the
  adversarial class at the end of training, model in eval mode, else 0 (a third class
  is no success);
- ``backdoor_success``: the percentage of the patched targets (every test image of the
  target class, up to 1,000, with the trigger pasted) classified as the adversarial class;
- ``val_acc``: clean accuracy on the test set without the targets.
"""
from __future__ import annotations

import torch

from poisonbench.data.augment import to_float
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore

EVAL_BATCH = 256


def validation_set(test: ImageSet, target_index: tuple[int, ...]) -> ImageSet:
    """The test set without the targets (what validation accuracy is measured on)."""
    keep = torch.ones(len(test), dtype=torch.bool)
    keep[torch.as_tensor(target_index, dtype=torch.long)] = False
    return ImageSet(test.images[keep], test.labels[keep], test.classes, test.name, test.split)


@torch.no_grad()
def target_metrics(model: torch.nn.Module, store: PoisonStore, test: ImageSet, adversarial_class: int,
                   device: torch.device) -> dict[str, float]:
    """``poison_success`` (a store without a trigger) or ``backdoor_success`` (with one)
    of ``model`` on the store's targets; the model's training mode is restored."""
    index = torch.as_tensor(store.target.target_index, dtype=torch.long)
    images = test.images[index]
    backdoor = "trigger" in store.extras
    if backdoor:
        images = store.apply_trigger(images)
    was_training = model.training
    model.eval()
    try:
        preds = torch.cat([model(to_float(batch.to(device))).argmax(1).cpu()
                           for batch in torch.split(images, EVAL_BATCH)])
    finally:
        model.train(was_training)
    hits = (preds == adversarial_class).float()
    if backdoor:
        return {"backdoor_success": 100.0 * float(hits.mean())}
    return {"poison_success": 100.0 * float(hits[0])}
