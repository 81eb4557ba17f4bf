"""Backbones that poisonbench pre-trains itself, for the shortcuts paper's defense
"pre-trained feature extractors" (Yu et al., 2022, Section 4, Table 4).

The paper fine-tunes, or trains a linear classifier on, a ResNet-152 that SimCLR
(Chen et al., 2020) pre-trained on ImageNet. Here a backbone is pre-trained on
auxiliary data that is never the defended dataset's (poisoned) training split
(``auxiliary``), either with SimCLR (``simclr``, no labels) or with labels
(``supervised``), and written as safetensors (``run.pretrain``; the command is
``poisonbench pretrain simclr|supervised --dataset D``).

Evidence, the cpu recipes (2 shared CPU cores, torch 2.15, small_cnn with pool 1 on
digits' 447-image aux split; linear probe = scikit-learn logistic regression on
frozen features of digits train, 900 images, scored on digits test, 450):
MEASUREMENTS_PLACEHOLDER
"""
from poisonbench.pretrain.auxiliary import AUXILIARY, auxiliary_dataset, load_auxiliary
from poisonbench.pretrain.run import METHODS, PretrainResult, default_path, pretrain, save_backbone

__all__ = ["AUXILIARY", "METHODS", "PretrainResult", "auxiliary_dataset", "default_path",
           "load_auxiliary", "pretrain", "save_backbone"]
