"""Simple models fitted with full-batch L-BFGS: the linear-separability probe of the
shortcuts paper (Yu et al. 2022, "Indiscriminate Poisoning Attacks Are Shortcuts",
Section 2.3, Table 1, Appendix E) and the linear classifier of its linear-eval
defense (Section 4, Appendix E).

Appendix E: "We train the simple models with standard cross-entropy loss. Before
training, all perturbations are flattened into 1-dimensional vectors and normalized
to unit norm. The two-layer neural networks have a width of 30. All models are
trained with the L-BFGS optimizer for 50 steps."

What "50 steps" means. The authors' script (github.com/dayu11/Availability-Attacks-
Create-Shortcuts, ``perturbations_are_linear_separable/test_linear_separability.py``)
calls ``torch.optim.LBFGS(net.parameters(), lr=0.5).step(closure)`` 50 times on the
full batch, leaving every other LBFGS argument at torch's default. One "step" is
therefore one ``LBFGS.step`` call of up to ``max_iter=20`` L-BFGS iterations (up to
25 loss evaluations), i.e. up to 1,000 iterations in all, with a fixed step of 0.5
along the L-BFGS direction (no line search) and a history of 100. ``ProbeParams``
defaults to exactly that; ``iters_per_step=1`` would make a step one iteration.

Where the fixed step diverges (the loss climbs above its starting value or overflows:
seen on one init of clean digits under torch 2.14), that step is undone and it and the
remaining steps use a strong-Wolfe line search (``Probe.fallback_step``); the script
would end with NaN weights.

Two differences between the paper's text and that script, and what we do:
* Normalisation: the text says unit norm per row; the script rescales the whole
  tensor to [0, 1] by its global min and max. ``separability`` follows the text
  (``unit_rows``); the probe itself fits whatever features it is given.
* Activation of the two-layer network: the text names none; the script uses Tanh
  (``nn.Linear(d, 30), nn.Tanh(), nn.Linear(30, C)``). ``activation`` defaults to
  the script's ``tanh``; ``relu`` is available.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from poisonbench.analysis.features import project, unit_rows
from poisonbench.errors import ConfigError

KINDS = ("linear", "two_layer")
ACTIVATIONS = ("tanh", "relu")
LINE_SEARCHES = (None, "strong_wolfe")
# Rows per forward pass in predict(): bounds memory for 50,000 × 3,072 inputs.
PREDICT_CHUNK = 8192


@dataclass(frozen=True)
class ProbeParams:
    kind: str = "linear"  # linear | two_layer: the two simple models of Table 1
    width: int = 30  # hidden width of the two-layer network (Appendix E)
    activation: str = "tanh"  # tanh | relu; Appendix E names none, the authors' script uses Tanh
    steps: int = 50  # LBFGS.step calls on the full batch ("50 steps", Appendix E; authors' script)
    iters_per_step: int = 20  # L-BFGS iterations per step: torch's max_iter default, left so by the script
    lr: float = 0.5  # L-BFGS step length (authors' script: optim.LBFGS(..., lr=0.5))
    history_size: int = 100  # curvature pairs kept (torch default, left so by the script)
    line_search: str | None = None  # None = fixed step lr (script); "strong_wolfe" for badly scaled features

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"probe kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"probe activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.line_search not in LINE_SEARCHES:
            raise ConfigError(f"probe line_search must be None or 'strong_wolfe', got {self.line_search!r}")
        for name in ("width", "steps", "iters_per_step", "history_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"probe {name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"probe lr must be positive, got {self.lr!r}")


@dataclass
class Probe:
    """A fitted simple model and how well it fits its training set."""

    module: nn.Module
    num_classes: int
    params: ProbeParams
    train_acc: float  # percent, on the features it was fitted on
    train_loss: float  # mean cross-entropy after the last step
    iterations: int  # L-BFGS iterations actually run (fewer than steps × iters_per_step once converged)
    evaluations: int  # loss-and-gradient evaluations actually run
    fallback_step: int | None = None  # the step whose fixed-length update diverged (see fit_lbfgs)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores float32 [N, C] on the CPU, computed in chunks on the probe's device."""
        features = _as_features(features)
        out = [self.module(part.to(self.device, torch.float32)).float().cpu()
               for part in torch.split(features, PREDICT_CHUNK)]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted labels int64 [N] on the CPU."""
        return self.logits(features).argmax(dim=1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Percent of ``labels`` predicted correctly."""
        labels = _as_labels(labels, features.shape[0], self.num_classes)
        if labels.numel() == 0:
            raise ConfigError("accuracy needs at least one sample, got 0")
        return 100.0 * float((self.predict(features) == labels.cpu()).sum()) / labels.numel()


def _as_features(features: torch.Tensor) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        got = f"{features.dtype} {tuple(features.shape)}" if isinstance(features, torch.Tensor) else type(features).__name__
        raise ConfigError(f"features must be a float tensor [N, D], got {got}")
    return features


def _as_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ConfigError(f"labels must be an int64 tensor [{n}] matching the features, got {got}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def _linear(d_in: int, d_out: int, gen: torch.Generator, device: torch.device) -> nn.Linear:
    """nn.Linear with torch's default init U(±1/√d_in) drawn from ``gen`` on the CPU,
    so the global RNG is untouched and the init does not depend on the device."""
    layer = nn.utils.skip_init(nn.Linear, d_in, d_out, device=device)
    bound = 1 / math.sqrt(d_in)
    with torch.no_grad():
        layer.weight.copy_((torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound)
        layer.bias.copy_((torch.rand(d_out, generator=gen) * 2 - 1) * bound)
    return layer


def build_module(d: int, num_classes: int, params: ProbeParams, seed: int,
                 device: torch.device) -> nn.Module:
    """The untrained simple model: Linear(d, C), or Linear(d, width) → act → Linear(width, C)."""
    gen = torch.Generator().manual_seed(int(seed))
    if params.kind == "linear":
        return _linear(d, num_classes, gen, device)
    act = nn.Tanh() if params.activation == "tanh" else nn.ReLU()
    return nn.Sequential(_linear(d, params.width, gen, device), act, _linear(params.width, num_classes, gen, device))


def fit_lbfgs(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
              params: ProbeParams | None = None, seed: int = 0,
              device: str | torch.device = "cpu") -> Probe:
    """Fit a simple model to (features, labels) by full-batch L-BFGS on the mean
    cross-entropy; features are used as given (normalise them first if wanted)."""
    params = params or ProbeParams()
    features = _as_features(features)
    n, d = features.shape
    if n == 0 or d == 0:
        raise ConfigError(f"features must have at least one row and one column, got {tuple(features.shape)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
    labels = _as_labels(labels, n, num_classes)
    device = torch.device(device)
    x = features.to(device, torch.float32)
    y = labels.to(device)
    module = build_module(d, num_classes, params, seed, device)

    def optimizer(line_search: str | None) -> torch.optim.LBFGS:
        return torch.optim.LBFGS(module.parameters(), lr=params.lr, max_iter=params.iters_per_step,
                                 history_size=params.history_size, line_search_fn=line_search)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        return loss

    def loss_now() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(module(x), y))

    start = loss_now()

    opt, line_search, fallback_step, step = optimizer(params.line_search), params.line_search, None, 0
    spent = (0, 0)  # (iterations, evaluations) of an optimizer given up on
    while step < params.steps:
        before = [p.detach().clone() for p in module.parameters()]
        opt.step(closure)
        after = loss_now()
        if math.isfinite(after) and after <= start:
            step += 1
            continue
        # The fixed step diverged: the loss rose above its value at the start of the fit,
        # or overflowed (seen on some inits of separable digits under torch 2.14: 1e23,
        # then NaN). Undo the step and take it and the rest with a strong-Wolfe line
        # search. The authors' script would go on diverging; the deviation is recorded as
        # ``fallback_step``.
        with torch.no_grad():
            for p, saved in zip(module.parameters(), before):
                p.copy_(saved)
        if line_search is not None:
            break  # nothing left to fall back to; the check below reports it if the loss is bad
        spent = _counts(opt, module)
        opt, line_search, fallback_step = optimizer("strong_wolfe"), "strong_wolfe", step
    with torch.no_grad():
        logits = module(x)
        loss = float(F.cross_entropy(logits, y))
        acc = 100.0 * float((logits.argmax(dim=1) == y).sum()) / n
    if not math.isfinite(loss):
        raise ConfigError(
            f"L-BFGS diverged (final loss {loss}) with lr={params.lr}, line_search={params.line_search!r}; "
            "expected a finite loss: normalise the features or use line_search='strong_wolfe'"
        )
    iterations, evaluations = (a + b for a, b in zip(spent, _counts(opt, module)))
    return Probe(module=module.eval(), num_classes=num_classes, params=params, train_acc=acc, train_loss=loss,
                 iterations=iterations, evaluations=evaluations, fallback_step=fallback_step)


def _counts(opt: torch.optim.LBFGS, module: nn.Module) -> tuple[int, int]:
    state = opt.state[next(iter(module.parameters()))]
    return int(state.get("n_iter", 0)), int(state.get("func_evals", 0))


def separability(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 kind: str = "linear", seed: int = 0, device: str | torch.device = "cpu",
                 params: ProbeParams | None = None, projection: str = "none",
                 dims: int | None = None) -> float:
    """Table 1's number: training accuracy (percent) of a ``kind`` model fitted to the
    rows of ``features`` scaled to unit ℓ2 norm (Appendix E). ``params`` sets the other
    fit settings; ``kind`` overrides its ``kind``. ``projection`` (random | pca) maps the
    unit rows to ``dims`` dimensions first (default: the paper's samples-per-dimension
    ratio, ``features.ratio_dims``; a no-op on CIFAR-10 itself)."""
    params = replace(params or ProbeParams(), kind=kind)  # ``kind`` wins; other fields from params
    x = project(unit_rows(_as_features(features)), projection, dims, seed=PROJECTION_SEED)
    return fit_lbfgs(x, labels, num_classes, params, seed, device).train_acc


# One projection for every row and trial of a table: rows then differ in their features
# only, and trials in the probe's initialisation only, as without a projection.
PROJECTION_SEED = 0


def claim_violations(perturbation_acc: dict[str, float], clean_acc: float, control_acc: float,
                     margin: float = 20.0) -> list[str]:
    """What contradicts Table 1's claim in a set of probe accuracies: every optimised
    attack's perturbations fit ``margin`` points better than the clean data and than
    the shuffled-label control. Empty when the claim holds."""
    out = []
    for name, acc in perturbation_acc.items():
        if acc < clean_acc + margin:
            out.append(f"{name} fits {acc:.1f} %, not {margin:g} points above clean data ({clean_acc:.1f} %)")
        if acc < control_acc + margin:
            out.append(f"{name} fits {acc:.1f} %, not {margin:g} points above the shuffled control "
                       f"({control_acc:.1f} %)")
    return out
