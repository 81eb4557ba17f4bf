"""``poisonbench import``: foreign poison files in their exact on-disk formats (pickles
written as the authors' code writes them) round-trip into verified stores on the
embedded digits data; files that do not fit are one sentence, exit 2, nothing written."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisonbench.cli import build_parser, main
from poisonbench.data.foreign import FORMATS, load_pickle
from poisonbench.data.store import PoisonStore
from poisonbench.errors import PoisonStoreError

EPS_LEVELS = 8  # the poisons' perturbation, pixel levels (MetaPoison and JHT use 8/255)


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def dump(obj, path: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def perturb(images: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    delta = torch.randint(-levels, levels + 1, images.shape, generator=g)
    delta[..., 0, 0] = levels  # every poison reaches the bound somewhere (where the pixel allows)
    return (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)


def pick(train, test, adversarial=3, target_class=5, count=6):
    base = torch.nonzero(train.labels == adversarial).flatten()[:count]
    target = int(torch.nonzero(test.labels == target_class).flatten()[2])
    return base, target


def write_jht(folder: Path, train, test, *, levels=EPS_LEVELS, indices_as=np.array, patch=None,
              base=None, target=None) -> tuple[Path, torch.Tensor, int, torch.Tensor]:
    """A Just How Toxic poison folder as craft_poisons_*.py writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen, chosen_target = pick(train, test)
    base = chosen if base is None else base
    target = chosen_target if target is None else target
    poisons = perturb(train.images[base.clamp(0, len(train) - 1)], levels, seed=1)
    adversarial = int(train.labels[base[0].clamp(0, len(train) - 1)])
    dump([(pil(p), adversarial) for p in poisons], folder / "poisons.pickle")
    dump(indices_as([int(i) for i in base]), folder / "base_indices.pickle")
    entry = (pil(test.images[target]), int(test.labels[target]))
    if patch is not None:
        entry = (*entry, *patch)
    dump(entry, folder / "target.pickle")
    dump([0.03] * len(base), folder / "perturbation_norms.pickle")  # written by the benchmark, not read
    return folder, base, target, poisons


def write_dp(path: Path, train, test, *, levels=EPS_LEVELS, keep=None, poisons_at=None, target=None,
             hwc=True) -> tuple[Path, torch.Tensor, int, np.ndarray]:
    """A data-poisoning external package as MetaPoison's victim.py -savepoisondataset
    writes it: float32 [0, 255] NHWC, training and test sets sorted by label."""
    order = torch.argsort(train.labels, stable=True)
    if keep is not None:
        order = order[keep]
    xtrain = train.images[order].permute(0, 2, 3, 1).numpy().astype(np.float32)
    ytrain = train.labels[order].numpy()
    adversarial = 3
    start = int(np.nonzero(ytrain == adversarial)[0][0])
    at = np.arange(start, start + 6) if poisons_at is None else poisons_at
    g = np.random.default_rng(0)
    delta = g.uniform(-levels, levels, size=(len(at), *xtrain.shape[1:])).astype(np.float32)
    delta[:, 0, 0, :] = levels
    xtrain[at] = np.clip(xtrain[at] + delta, 0, 255)
    _, chosen_target = pick(train, test)
    target = chosen_target if target is None else target
    test_order = torch.argsort(test.labels, stable=True)
    package = dict(
        xtrain=xtrain if hwc else xtrain.transpose(0, 3, 1, 2), ytrain=ytrain,
        xtarget=test.images[[target]].permute(0, 2, 3, 1).numpy().astype(np.float32),
        ytarget=test.labels[[target]].numpy(), ytargetadv=np.array([adversarial]),
        xvalid=test.images[test_order].permute(0, 2, 3, 1).numpy().astype(np.float32),
        yvalid=test.labels[test_order].numpy(),
    )
    dump(package, path, protocol=3)  # victim.py's pickle.dump default under python 3.7
    return path, order[at], target, xtrain[at]


def run_import(capsys, *argv) -> tuple[int, str, str]:
    code = main(["import", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ round trips
def test_jht_folder_round_trips_into_a_verified_store(tmp_path, capsys, digits):
    train, test = digits
    folder, base, target, poisons = write_jht(tmp_path / "fc", train, test)
    out = tmp_path / "jht.safetensors"
    code, stdout, err = run_import(capsys, "jht", folder, "--dataset", "digits", "--out", out)
    assert code == 0, err
    assert str(out) in stdout and "6 of 900" in stdout

    store = PoisonStore.open(out, train, test)
    order = torch.argsort(base)
    assert torch.equal(store.index, base[order])
    assert torch.equal(store.images, poisons[order])
    assert torch.equal(store.labels, torch.full((6,), 3))
    assert store.target.target_index == (target,) and store.target.adversarial_class == 3
    assert store.test_fingerprint == test.fingerprint
    assert store.attack == "import:jht" and store.norm == "linf" and store.eps == pytest.approx(16 / 255)
    assert store.params["source_sha256"] == {n: sha256(folder / n) for n in
                                             ("poisons.pickle", "base_indices.pickle", "target.pickle")}
    assert store.budget["linf"] == EPS_LEVELS


def test_jht_base_indices_as_a_plain_list_and_the_default_store_path(tmp_path, capsys, digits):
    train, test = digits
    folder, base, _, _ = write_jht(tmp_path / "fc", train, test, indices_as=list)
    code, stdout, err = run_import(capsys, "jht", folder / "poisons.pickle", "--dataset", "digits")
    assert code == 0, err
    path = Path(stdout.split()[0])
    assert path.parent == Path(os.environ["POISONBENCH_HOME"]) / "stores" / "import" and path.name.startswith("jht-")
    assert torch.equal(PoisonStore.open(path, train, test).index, base.sort().values)


def test_jht_patch_becomes_the_stores_trigger_pasted_as_poison_test_pastes_it(tmp_path, capsys, digits):
    from torchvision import transforms

    train, test = digits
    patch = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))  # craft_poisons_htbd.py: a tensor
    x, y = 20, 22
    folder, _, target, _ = write_jht(tmp_path / "htbd", train, test, patch=(patch, [x, y]))
    out = tmp_path / "htbd.safetensors"
    code, _, err = run_import(capsys, "jht", folder, "--dataset", "digits", "--out", out)
    assert code == 0, err
    store = PoisonStore.open(out, train, test)
    assert int(store.extras["trigger_mask"].sum()) == 25

    # poison_test.py: ToTensor(target), paste the float patch at [:, y:y+p, x:x+p], ToPILImage.
    seen = transforms.ToTensor()(pil(test.images[target]))
    seen[:, y:y + 5, x:x + 5] = patch
    expected = torch.from_numpy(np.array(transforms.ToPILImage()(seen))).permute(2, 0, 1)
    assert torch.equal(store.apply_trigger(test.images[[target]])[0], expected)


def test_dp_external_package_round_trips_with_its_poisons_found_by_matching(tmp_path, capsys, digits):
    train, test = digits
    path, base, target, poisons = write_dp(tmp_path / "poisondataset-60.pkl", train, test)
    out = tmp_path / "mp.safetensors"
    code, stdout, err = run_import(capsys, "dp_external", path, "--dataset", "digits", "--eps", "8/255", "--out", out)
    assert code == 0, err
    store = PoisonStore.open(out, train, test)
    order = torch.argsort(base)
    assert torch.equal(store.index, base[order])  # the poisons' places in the dataset's own order
    rounded = torch.from_numpy(np.rint(poisons)).to(torch.uint8).permute(0, 3, 1, 2)
    assert torch.equal(store.images, rounded[order])
    assert store.target.target_index == (target,) and store.target.adversarial_class == 3
    assert store.attack == "import:dp_external" and store.eps == pytest.approx(8 / 255)
    assert store.params == {"format": "dp_external", "source_sha256": {path.name: sha256(path)}}
    assert store.budget["linf"] <= EPS_LEVELS


def test_dp_external_package_of_part_of_the_training_set(tmp_path, capsys, digits):
    """MetaPoison's quick start keeps a part of the training set: the rest stays clean."""
    train, test = digits
    keep = torch.arange(0, len(train), 3)
    path, base, _, _ = write_dp(tmp_path / "part.pkl", train, test, keep=keep, poisons_at=np.arange(100, 104))
    out = tmp_path / "part.safetensors"
    code, _, err = run_import(capsys, "dp_external", path, "--dataset", "digits", "--out", out)
    assert code == 0, err
    assert torch.equal(PoisonStore.open(out, train, test).index, base.sort().values)


def test_an_imported_store_trains_end_to_end(tmp_path, capsys, digits):
    train, test = digits
    folder, _, target, _ = write_jht(tmp_path / "fc", train, test)
    out = tmp_path / "jht.safetensors"
    assert run_import(capsys, "jht", folder, "--dataset", "digits", "--out", out)[0] == 0
    job = tmp_path / "job"
    code = main(["train", "--dataset", "digits", "--model", "small_cnn", "--store", str(out), "--fast-dev-run",
                 "--out", str(job)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((job / "result.json").read_text())
    assert result["store"]["attack"] == "import:jht"
    assert result["target"]["target_index"] == [target] and result["target"]["adversarial_class"] == 3
    assert set(result["metrics"]) >= {"poison_success", "val_acc"}


# --------------------------------------------------------------------- refusals
def refused(capsys, tmp_path, argv, *words):
    out = tmp_path / "refused.safetensors"
    before = set((Path(os.environ["POISONBENCH_HOME"]) / "stores" / "import").glob("*"))
    code, stdout, err = run_import(capsys, *argv, "--out", out)
    assert code == 2 and stdout == ""
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("poisonbench: error: "), err
    for word in words:
        assert word in err, err
    assert not out.exists() and not list(tmp_path.glob(".refused*"))  # no file, no temporary left
    assert set((Path(os.environ["POISONBENCH_HOME"]) / "stores" / "import").glob("*")) == before
    return err


def test_over_budget_jht_poison_is_refused(tmp_path, capsys, digits):
    train, test = digits
    folder, base, _, _ = write_jht(tmp_path / "fc", train, test, levels=20)
    err = refused(capsys, tmp_path, ["jht", folder, "--dataset", "digits"], "20/255", "over the budget 16/255",
                  str(folder))
    assert f"training image {int(base[0])}" in err


def test_over_budget_dp_external_poison_is_refused(tmp_path, capsys, digits):
    train, test = digits
    path, _, _, _ = write_dp(tmp_path / "mp.pkl", train, test, levels=EPS_LEVELS)
    refused(capsys, tmp_path, ["dp_external", path, "--dataset", "digits", "--eps", "4/255"],
            "8/255", "over the budget 4/255", str(path))


def test_a_budget_that_holds_the_poisons_admits_them(tmp_path, capsys, digits):
    train, test = digits
    folder, _, _, _ = write_jht(tmp_path / "fc", train, test, levels=20)
    out = tmp_path / "s.safetensors"
    assert run_import(capsys, "jht", folder, "--dataset", "digits", "--eps", "20/255", "--out", out)[0] == 0
    assert PoisonStore.open(out, train, test).budget["linf"] == 20


@pytest.mark.parametrize("case, words", [
    ("index_out_of_range", ["base indices must lie in [0, 900)", "base_indices.pickle"]),
    ("repeated_index", ["base indices must be unique"]),
    ("target_not_in_test", ["target 0 (class 5) is not an image of the digits test split"]),
    ("poisons_not_pairs", ["must hold a non-empty list of (image, label) pairs"]),
    ("image_not_pil", ["poison 0 must be a PIL image, got ndarray"]),
    ("patch_outside", ["does not fit in a 32×32 image"]),
    ("missing_target", ["lacks target.pickle"]),
])
def test_jht_files_that_do_not_fit_are_refused(tmp_path, capsys, digits, case, words):
    train, test = digits
    folder = tmp_path / case
    if case == "index_out_of_range":
        base, _ = pick(train, test)
        write_jht(folder, train, test, base=torch.cat([base[:-1], torch.tensor([len(train)])]))
    elif case == "repeated_index":
        base, _ = pick(train, test)
        write_jht(folder, train, test, base=torch.cat([base[:-1], base[:1]]))
    elif case == "patch_outside":
        write_jht(folder, train, test, patch=(torch.rand(3, 5, 5), [30, 0]))
    else:
        write_jht(folder, train, test)
    if case == "target_not_in_test":
        _, target = pick(train, test)
        dump((pil(perturb(test.images[target], 3, seed=2)), 5), folder / "target.pickle")
    elif case == "poisons_not_pairs":
        dump([1, 2, 3], folder / "poisons.pickle")
    elif case == "image_not_pil":
        dump([(train.images[0].numpy(), 3)], folder / "poisons.pickle")
        dump([0], folder / "base_indices.pickle")
    elif case == "missing_target":
        (folder / "target.pickle").unlink()
    refused(capsys, tmp_path, ["jht", folder, "--dataset", "digits"], *words)


@pytest.mark.parametrize("case, words", [
    ("channels_first", ["xtrain must be images N×32×32×3", "got float32 (900, 3, 32, 32)"]),
    ("missing_key", ["lacks ytargetadv"]),
    ("other_dataset", ["are images of the digits train split", "not made from that dataset"]),
    ("target_not_in_test", ["target 0 (class 5) is not an image of the digits test split"]),
    ("unit_range", ["holds pixels in [0, 1]"]),
    ("not_a_dict", ["must hold a dict with keys xtrain"]),
])
def test_dp_external_packages_that_do_not_fit_are_refused(tmp_path, capsys, digits, case, words):
    train, test = digits
    path, _, _, _ = write_dp(tmp_path / "mp.pkl", train, test, hwc=case != "channels_first")
    package = pickle.loads(path.read_bytes())
    if case == "missing_key":
        del package["ytargetadv"]
    elif case == "other_dataset":
        package["xtrain"] = 255 - package["xtrain"]
    elif case == "target_not_in_test":
        package["xtarget"] = np.clip(package["xtarget"] + 3, 0, 255)
    elif case == "unit_range":
        package["xtrain"] = package["xtrain"] / 255
    elif case == "not_a_dict":
        package = list(package.values())
    dump(package, path)
    refused(capsys, tmp_path, ["dp_external", path, "--dataset", "digits"], *words)


class Payload:
    """What a malicious pickle does: run a command when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, capsys, digits):
    train, test = digits
    folder, _, _, _ = write_jht(tmp_path / "evil", train, test)
    marker = tmp_path / "ran"
    dump((Payload(marker), 5), folder / "target.pickle")
    refused(capsys, tmp_path, ["jht", folder, "--dataset", "digits"], "system", "does not unpickle")
    assert not marker.exists()


def test_restricted_unpickler_reads_the_types_these_files_hold(tmp_path):
    tensor = torch.rand(3, 4, 4)
    obj = {"a": np.arange(5, dtype=np.int64), "t": tensor, "s": np.float32(2.5), "img": pil(torch.zeros(3, 2, 2, dtype=torch.uint8))}
    for protocol in (0, 2, 3, 4, 5):
        back = load_pickle(dump(obj, tmp_path / f"p{protocol}.pickle", protocol=protocol))
        assert np.array_equal(back["a"], obj["a"]) and torch.equal(back["t"], tensor) and back["s"] == 2.5
        assert back["img"].state[1] == "RGB" and back["img"].state[2] == (2, 2)


def test_a_file_that_is_no_pickle_is_one_sentence(tmp_path):
    path = tmp_path / "x.pickle"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(PoisonStoreError, match="is not a readable pickle"):
        load_pickle(path)


def test_bad_budget_is_refused_before_reading(tmp_path, capsys):
    code, _, err = run_import(capsys, "jht", tmp_path / "nowhere", "--dataset", "digits", "--eps", "16/0")
    assert code == 2 and "--eps expects a number or a fraction" in err
    code, _, err = run_import(capsys, "jht", tmp_path / "nowhere", "--dataset", "digits", "--eps", "16")
    assert code == 2 and "l-inf budget is in pixel units" in err


def test_the_verb_offers_every_format():
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "import" in a.choices)
    fmt = next(a for a in sub.choices["import"]._actions if a.dest == "format")
    assert set(fmt.choices) == set(FORMATS)


def test_an_l0_budget_admits_patched_poisons_and_refuses_changes_outside_the_patch(tmp_path, capsys, digits):
    """A backdoor whose poisons carry the patch alone: ℓ0 = the patch's area by default."""
    train, test = digits
    patch = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(1))
    x, y = 27, 27
    folder, base, _, _ = write_jht(tmp_path / "patched", train, test, patch=(patch, [x, y]))
    patched = train.images[base].clone()
    patched[:, :, y:y + 5, x:x + 5] = (patch * 255).to(torch.uint8)
    dump([(pil(p), 3) for p in patched], folder / "poisons.pickle")
    out = tmp_path / "l0.safetensors"
    code, _, err = run_import(capsys, "jht", folder, "--dataset", "digits", "--norm", "l0", "--out", out)
    assert code == 0, err
    store = PoisonStore.open(out, train, test)
    assert store.norm == "l0" and store.eps == 25 and torch.equal(store.images, patched[torch.argsort(base)])

    outside = patched.clone()
    outside[0, :, 0, 0] ^= 1
    dump([(pil(p), 3) for p in outside], folder / "poisons.pickle")
    refused(capsys, tmp_path, ["jht", folder, "--dataset", "digits", "--norm", "l0"],
            f"{folder}: 1 poisons differ from the clean images outside the trigger_mask")


def test_a_target_one_level_off_after_a_float_round_trip_is_still_found(tmp_path, capsys, digits):
    """Normalise, then un-normalise in float (the authors' crafting scripts) may move a pixel by one level."""
    train, test = digits
    folder, _, target, _ = write_jht(tmp_path / "fc", train, test)
    moved = test.images[target].clone()
    moved[0, 5, 5] = moved[0, 5, 5] + 1 if moved[0, 5, 5] < 255 else 254
    dump((pil(moved), int(test.labels[target])), folder / "target.pickle")
    out = tmp_path / "s.safetensors"
    assert run_import(capsys, "jht", folder, "--dataset", "digits", "--out", out)[0] == 0
    assert PoisonStore.open(out, train, test).target.target_index == (target,)
