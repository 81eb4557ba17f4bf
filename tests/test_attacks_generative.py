"""DeepConfuse and NTGA: budget, clean labels, determinism, interrupted crafting that
resumes to the same store, the empirical NTK against a direct J·Jᵀ, the kernel
predictor against its eigendecomposition form, and one behavioural check each."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import poisonbench.attacks.deepconfuse as deepconfuse
import poisonbench.attacks.ntga as ntga
from poisonbench.attacks import ATTACKS
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError

from crafting_checks import interrupt_then_resume, random_imageset

# Three units each (rounds / blocks), so that a run interrupted after unit 1 resumes at unit 2.
PARAMS = {
    "deepconfuse": {**deepconfuse.SMOKE, "epochs": 3, "batch_size": 24},
    "ntga": {**ntga.SMOKE, "block_size": 8, "val_size": 8},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    # 16×16: the smallest side the 4-level U-Net takes, and a quarter of the work of 32×32.
    return random_imageset(8, side=16, name="tiny16")


@pytest.fixture(scope="module")
def reference(tiny):
    return {name: ATTACKS.get(name).craft(tiny, params, seed=3) for name, params in PARAMS.items()}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_budget_clean_labels_and_seeds(name, tiny, reference):
    store = reference[name]
    delta = store.images.int() - tiny.images.int()
    assert torch.equal(store.index, torch.arange(len(tiny)))
    assert torch.equal(store.labels, tiny.labels)  # clean-label
    assert store.norm == "linf" and delta.abs().max() <= 8  # 8/255 in whole pixel levels
    assert delta.abs().sum() > 0
    store.verify(tiny)
    other = ATTACKS.get(name).craft(tiny, PARAMS[name], seed=4)
    assert not torch.equal(store.images, other.images)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_interrupted_crafting_resumes_to_the_same_store(name, tiny, reference, tmp_path):
    resumed, units = interrupt_then_resume(ATTACKS.get(name), tiny, PARAMS[name], 3,
                                           tmp_path / "partial.safetensors")
    assert units == [2]  # units 0 and 1 came from the checkpoint
    # Equal to the uninterrupted run, which was computed separately: deterministic too.
    assert torch.equal(resumed.images, reference[name].images)


# --------------------------------------------------------------------------- NTGA


def _direct_jacobian(net, x):
    """Row i: the gradient of the net's output at x[i] w.r.t. every parameter, one by one."""
    weights = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    names = [n for n, _ in net.named_parameters()]
    rows = []
    for i in range(x.shape[0]):
        out = torch.func.functional_call(net, dict(zip(names, weights)), (x[i:i + 1],)).squeeze()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, weights)]))
    return torch.stack(rows)


def test_ntk_is_symmetric_psd_and_equals_direct_jacobian_product():
    params = ntga.NTGAParams(width=3, dense1=8, dense2=4)
    net = ntga.build_surrogate((3, 16, 16), params, seed=0)
    g = torch.Generator().manual_seed(1)
    x, z = torch.rand(6, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    k = ntga.empirical_ntk(net, x, chunk=4)  # chunks of 4 and 2: the pieces join up
    assert k.dtype == torch.float64 and k.shape == (6, 6)
    assert torch.allclose(k, k.T, rtol=1e-5, atol=1e-6)
    assert torch.linalg.eigvalsh(k).min() > -1e-6 * k.diagonal().max()
    jx, jz = _direct_jacobian(net, x), _direct_jacobian(net, z)
    assert torch.allclose(k, (jx @ jx.T).double(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(ntga.empirical_ntk(net, z, x), (jz @ jx.T).double(), rtol=1e-4, atol=1e-5)


def test_kernel_predictor_matches_its_eigendecomposition_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)
    k_train, k_test = a @ a.T, torch.randn(3, 7, generator=g, dtype=torch.float64) @ a.T
    y = F.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3)
    t, reg = 8.0, 1e-4
    kr = k_train + reg * k_train.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(kr)
    # neural-tangents' gradient_descent_mse: Θ⁻¹(1 − e^{−λ t / (n·C)}) in Θ's eigenbasis.
    factor = -torch.expm1(-evals * t / y.numel()) / evals
    expected = k_test @ evecs @ torch.diag(factor) @ evecs.T @ y.double()
    assert torch.allclose(ntga.kernel_predict(k_train, k_test, y, t, reg), expected, atol=1e-10)
    # t = ∞ interpolates the training labels (up to the ridge).
    fitted = ntga.kernel_predict(k_train, k_train, y, None, 1e-9)
    assert torch.allclose(fitted, y.double(), atol=1e-5)


def test_ntga_raises_the_kernel_predictors_validation_loss(tiny):
    params = ntga.NTGAParams(**{**ntga.SMOKE, "nb_iter": 3})
    net = ntga.build_surrogate((3, 16, 16), params, seed=0)
    images = tiny.images.float() / 255
    block, val = torch.arange(0, 24, 2), torch.arange(1, 24, 2)
    x, y, x_val, y_val = images[block], tiny.labels[block], images[val], tiny.labels[val]
    delta, poisoned_loss = ntga.attack_block(net, x, y, x_val, y_val, 3, params)
    assert delta.abs().max() <= params.eps + 1e-6
    with torch.no_grad():
        clean_loss = float(ntga.validation_loss(net, x, y, x_val, y_val, 3, params))
    assert poisoned_loss > clean_loss


def test_ntga_validation_set_excludes_the_block():
    block = torch.tensor([0, 3, 5])
    val = ntga.validation_indices(10, block, 100, seed=0, unit=0)
    assert val.numel() == 7 and not set(val.tolist()) & set(block.tolist())
    parts = ntga.blocks(10, 4, seed=0)
    assert [p.numel() for p in parts] == [4, 4, 2]  # the partial block is poisoned too
    assert sorted(torch.cat(parts).tolist()) == list(range(10))


# --------------------------------------------------------------------- DeepConfuse


def test_generator_output_is_within_eps_and_per_image():
    eps = 8 / 255
    gen = deepconfuse.build_generator(4, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    x[0] = 0.0  # clipped at the bottom of the pixel range
    x[1] = 1.0  # and at the top
    delta = deepconfuse.generate(gen, x, eps, batch_size=4)
    assert delta.abs().max() <= eps + 1e-6
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1 + 1e-6).all()
    assert not torch.allclose(delta[2], delta[3])  # a function of the image, not one pattern
    # Eval mode: an image's perturbation does not depend on its batch.
    assert torch.allclose(deepconfuse.generate(gen, x[2:3], eps, 1), delta[2:3], atol=1e-6)


def test_lookahead_loss_reaches_the_generator():
    params = deepconfuse.DeepConfuseParams(**deepconfuse.SMOKE)
    gen = deepconfuse.build_generator(4, seed=0)
    cls = deepconfuse._classifier(params, 3, seed=0, unit=0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16, generator=g), torch.arange(8) % 3
    only_poisoned = copy.deepcopy(cls)
    with torch.no_grad():
        only_poisoned(deepconfuse.perturb(gen, x, params.eps))
    loss = deepconfuse.lookahead_step(gen, cls, x, y, params)
    grads = torch.autograd.grad(loss, list(gen.parameters()))
    assert sum(float(g.abs().sum()) for g in grads) > 0  # through θ' = θ − lr·∇θ
    # The look-ahead runs on copies of the buffers: only the poisoned forward pass moved
    # the classifier's running statistics.
    for (name, value), (_, expected) in zip(cls.named_buffers(), only_poisoned.named_buffers()):
        assert torch.allclose(value, expected), name


def test_deepconfuse_rejects_image_sides_the_unet_cannot_halve_four_times():
    odd = ImageSet(torch.zeros(4, 3, 20, 20, dtype=torch.uint8), torch.arange(4) % 2, ["a", "b"])
    with pytest.raises(ConfigError, match="multiples of 16"):
        ATTACKS.get("deepconfuse").craft(odd, deepconfuse.SMOKE, seed=0)
