"""Analyses of perturbations and victims: image grids (linear-separability probes and
t-SNE arrive with the shortcuts analyses)."""

from poisonbench.analysis.features import clean_features, perturbations, unit_rows
from poisonbench.analysis.probe import Probe, ProbeParams, fit_lbfgs, separability
from poisonbench.analysis.tsne import tsne_figure

__all__ = ["clean_features", "perturbations", "unit_rows", "Probe", "ProbeParams", "fit_lbfgs",
           "separability", "tsne_figure"]
