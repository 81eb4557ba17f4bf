"""Backbones that poisonbench pre-trains itself, for the shortcuts paper's defense
"pre-trained feature extractors" (Yu et al., 2022, Section 4, Table 4).

The paper fine-tunes, or trains a linear classifier on, a ResNet-152 that SimCLR
(Chen et al., 2020) pre-trained on ImageNet. Here a backbone is pre-trained on
auxiliary data that is never the defended dataset's (poisoned) training split
(``auxiliary``), either with SimCLR (``simclr``, no labels) or with labels
(``supervised``), and written as safetensors (``run.pretrain``; the command is
``poisonbench pretrain simclr|supervised --dataset D``).

Evidence for the cpu recipes (``simclr.DIGITS``, ``supervised.DIGITS``: small_cnn with
pool 1, 20 epochs on digits' 447-image aux split; torch 2.15 on 2 CPU cores shared
with other work, load average 9-11, so the times are upper bounds). Probe: scikit-
learn's LogisticRegression on the frozen features of digits train (900 images),
scored on digits test (450), on raw features / standardized features; "poisoned"
trains the probe on the synthetic attack's store of digits train (default
parameters, seed 0) instead. Seeds 0 and 1:

    backbone                 wall (cpu) s   clean raw / std   poisoned raw / std
    SimCLR                   170 (91)       91.8 / 98.0       90.9 / 98.0
                             206 (128)      95.1 / 97.3       94.0 / 96.9
    supervised               71 (47)        97.3 / 98.2       96.7 / 98.2
                             100 (50)       97.8 / 98.9       97.8 / 98.4
    random init (no pre-training)            37.8 / 96.4       36.9 / 95.1
                                             44.4 / 97.8       40.9 / 96.4

Standardized, even random features of a global-pool CNN separate digits linearly, so
on digits only the raw-feature probe shows what pre-training adds. Without the
batch normalization in SimCLR's projection head (``simclr.ProjectionHead``) the same
recipe reached 79.6 / 95.1 (seed 0).
"""
from poisonbench.pretrain.auxiliary import AUXILIARY, auxiliary_dataset, load_auxiliary
from poisonbench.pretrain.run import METHODS, PretrainResult, default_path, pretrain, save_backbone

__all__ = ["AUXILIARY", "METHODS", "PretrainResult", "auxiliary_dataset", "default_path",
           "load_auxiliary", "pretrain", "save_backbone"]
