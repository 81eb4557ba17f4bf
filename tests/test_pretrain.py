"""Pre-training backbones for the pre-trained-extractor defense: the NT-Xent loss, the
per-image SimCLR views (checked against torchvision image by image), LARS and the
schedule, the digits aux split, the auxiliary-data table, and a one-epoch SimCLR run
through the CLI that writes a backbone a fresh model loads strictly."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as TF

from poisonbench.cli import main
from poisonbench.data import load_imageset
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.pretrain import auxiliary_dataset, default_path
from poisonbench.pretrain import views as V
from poisonbench.pretrain.lars import LARS
from poisonbench.pretrain.simclr import SimCLRParams, nt_xent, warmup_cosine


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# --- NT-Xent ----------------------------------------------------------------------


def test_nt_xent_equals_a_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    tau = 0.5
    views = [[a / math.hypot(a, b), b / math.hypot(a, b)] for a, b in ([1, 0], [0, 2], [1, 1], [3, -1])]
    sim = [[(a[0] * b[0] + a[1] * b[1]) / tau for b in views] for a in views]
    total = 0.0
    for i in range(4):
        partner = (i + 2) % 4
        denominator = sum(math.exp(sim[i][k]) for k in range(4) if k != i)
        total += -math.log(math.exp(sim[i][partner]) / denominator)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / 4, rel=1e-6)


def test_nt_xent_is_symmetric_and_scale_free():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    loss = nt_xent(z1, z2, 0.5)
    assert nt_xent(z2, z1, 0.5).item() == pytest.approx(loss.item(), rel=1e-6)
    assert nt_xent(3 * z1, z2, 0.5).item() == pytest.approx(loss.item(), rel=1e-6)  # cosine similarity
    # Identical views are a better positive than random ones.
    assert nt_xent(z1, z1, 0.5) < loss


# --- views ------------------------------------------------------------------------


@pytest.fixture()
def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(24, 3, 32, 32, generator=gen)
    x[:3] = x[:3, :1].expand(-1, 3, -1, -1)  # a few exact grays, where hue is undefined
    return x


def test_crop_and_flip_match_torchvision_per_image(batch):
    torch.manual_seed(2)
    boxes = V.crop_boxes(len(batch), 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), batch.device)
    flip = torch.rand(len(batch)) < 0.5
    out = V.resized_crop(batch, boxes, 32, flip)
    for image, (top, left, h, w), flipped, got in zip(batch, boxes.tolist(), flip, out):
        assert 1 <= h <= 32 and 1 <= w <= 32 and 0 <= top <= 32 - h and 0 <= left <= 32 - w
        ref = TF.resized_crop(image, top, left, h, w, [32, 32], antialias=True)
        ref = TF.horizontal_flip(ref) if flipped else ref
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op, ref", [
    (V.adjust_brightness, TF.adjust_brightness), (V.adjust_contrast, TF.adjust_contrast),
    (V.adjust_saturation, TF.adjust_saturation), (V.adjust_hue, TF.adjust_hue),
])
def test_colour_ops_match_torchvision_per_image(batch, op, ref):
    torch.manual_seed(3)
    which = [V.adjust_brightness, V.adjust_contrast, V.adjust_saturation, V.adjust_hue].index(op)
    factors = V.jitter_factors(len(batch), V.ViewParams(), batch.device)[:, which]
    out = op(batch, factors)
    for image, factor, got in zip(batch, factors.tolist(), out):
        torch.testing.assert_close(got, ref(image, factor), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.grayscale(batch), TF.rgb_to_grayscale(batch, 1), atol=1e-6, rtol=0)


def test_jitter_follows_each_images_order_and_skips_unapplied(batch):
    n = len(batch)
    torch.manual_seed(4)
    factors = V.jitter_factors(n, V.ViewParams(), batch.device)
    order = torch.argsort(torch.rand(n, 4), dim=1)
    apply = torch.arange(n) % 3 != 0
    out = V.color_jitter(batch, factors, order, apply)
    refs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        expected = batch[i]
        if apply[i]:
            for op in order[i].tolist():
                expected = refs[op](expected, factors[i, op].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_views_differ_per_image_and_stay_in_pixel_range():
    same = torch.rand(1, 3, 32, 32).expand(16, -1, -1, -1).contiguous()
    torch.manual_seed(5)
    out = V.random_view(same)
    assert out.shape == same.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    flat = out.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat.round(decimals=5)}
    assert len(distinct) == 16  # one set of random parameters per image, not per batch
    assert not torch.equal(V.random_view(same), out)  # and fresh ones per call


# --- optimiser and schedule -------------------------------------------------------


def test_lars_scales_weights_by_the_trust_ratio_and_leaves_biases_plain():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    LARS([w, b], lr=0.1, weight_decay=0.0, eta=0.001).step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 0.001 * 5.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(0, 100, 0) == pytest.approx(1.0)


def test_simclr_params_are_checked():
    assert SimCLRParams().lr == pytest.approx(1.2)  # 0.3 × 1024 / 256
    with pytest.raises(ConfigError, match="optimizer"):
        SimCLRParams(optimizer="adam")
    assert SimCLRParams().with_epochs(50).warmup_epochs == 1


# --- auxiliary data ---------------------------------------------------------------


def test_digits_aux_split_is_disjoint_stratified_and_leaves_test_unchanged():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from poisonbench.data import digits

    y = load_digits().target
    split = digits.split_indices(y)
    assert {k: len(v) for k, v in split.items()} == {"train": 900, "aux": 447, "test": 450}
    old_train, old_test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    assert np.array_equal(split["test"], np.sort(old_test))
    assert np.array_equal(np.sort(np.concatenate([split["train"], split["aux"]])), np.sort(old_train))
    assert not set(split["aux"]) & set(split["train"])
    counts = np.bincount(y[split["aux"]], minlength=10)
    assert counts.min() >= 44 and counts.max() <= 45
    aux, train = load_imageset("digits", split="aux"), load_imageset("digits", split="train")
    assert (len(train), len(aux), aux.split) == (900, 447, "aux")
    assert np.array_equal(aux.labels.numpy(), y[split["aux"]])


def test_aux_split_is_only_for_datasets_that_have_one(fixture_root):
    with pytest.raises(ConfigError, match=r"split must be one of train, test, got 'aux' \(only digits"):
        load_imageset("cifar10", fixture_root, "aux")
    with pytest.raises(ConfigError, match="split must be one of train, test, aux, got 'val'"):
        load_imageset("digits", split="val")


def test_auxiliary_dataset_table():
    assert auxiliary_dataset("cifar10") == ("cifar100", "train")
    assert auxiliary_dataset("cifar100") == ("cifar10", "train")
    assert auxiliary_dataset("digits") == ("digits", "aux")
    with pytest.raises(ConfigError, match="no default auxiliary data"):
        auxiliary_dataset("svhn")
    assert auxiliary_dataset("svhn", ("cifar10", "train")) == ("cifar10", "train")
    with pytest.raises(ConfigError, match="own training split"):
        auxiliary_dataset("digits", ("digits", "train"))


# --- end to end -------------------------------------------------------------------


@pytest.fixture()
def one_thread():
    """One intra-op thread: on a CPU shared with other jobs, the views' many small
    elementwise kernels spend most of their time waiting for a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_simclr_epoch_writes_a_backbone_that_loads_strictly(capsys, tmp_path, one_thread):
    out_file = tmp_path / "bb.safetensors"
    # A narrow small_cnn (width 8) keeps the run to a few seconds; the recipe's is width 32.
    code, out, err = run_cli(capsys, "pretrain", "simclr", "--dataset", "digits", "--model", "small_cnn",
                             "--model-param", "width=8", "pool=1", "--epochs", "1", "--batch-size", "256",
                             "--out", str(out_file))
    assert code == 0, err
    assert str(out_file) in out and "digits aux" in out and "447 images" in out
    fresh = build_model("small_cnn", 10, width=8, pool=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(load_file(str(out_file)), strict=True)
    assert not torch.equal(before["backbone.layers.0.weight"], fresh.state_dict()["backbone.layers.0.weight"])
    with safe_open(str(out_file), "pt") as f:
        meta = f.metadata()
    assert (meta["method"], meta["aux_dataset"], meta["aux_split"], meta["model"]) == ("simclr", "digits", "aux", "small_cnn")
    assert json.loads(meta["model_params"]) == {"width": 8, "pool": 1} and json.loads(meta["params"])["epochs"] == 1
    # The models' own weights parameter reads it too.
    build_model("small_cnn", 10, width=8, pool=1, weights=str(out_file))


def test_default_path_is_under_home(isolated_home):
    assert default_path("cifar10", "simclr", "timm:resnet152") == isolated_home / "backbones" / "cifar10_simclr_timm-resnet152.safetensors"


@pytest.mark.parametrize("argv, fragment", [
    (["pretrain", "simclr", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["pretrain", "simclr", "--dataset", "svhn"], "no default auxiliary data"),
    (["pretrain", "byol", "--dataset", "digits"], "invalid choice"),
    (["pretrain", "simclr", "--dataset", "digits", "--model", "resnet19"], "unknown model 'resnet19'"),
    (["pretrain", "simclr", "--dataset", "digits", "--model-param", "radius=3"], "no parameter 'radius'"),
    (["pretrain", "supervised", "--dataset", "digits", "--epochs", "0"], "--epochs: expected an integer of at least 1"),
    (["pretrain", "simclr", "--dataset", "digits", "--aux", "digits:train"], "own training split"),
])
def test_bad_input_is_one_sentence(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
