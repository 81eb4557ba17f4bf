"""Dataset loaders over the registry, on fixtures in the real on-disk formats (no network)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from poisonbench.data import DATASETS, ImageSet, load_imageset
from poisonbench.data import cifar, digits, download, fixtures
from poisonbench.errors import ConfigError, DataFormatError, DataNotFoundError, UnknownNameError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10}
FILE_DATASETS = ["cifar10", "cifar100", "svhn"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Python-version CIFAR and SVHN fixtures (default sizes, seed 0); never modified."""
    root = tmp_path_factory.mktemp("data")
    fixtures.write_fixtures(root)
    return root


@pytest.fixture(scope="session")
def binary_root(tmp_path_factory) -> Path:
    """Only the binary CIFAR versions of the same data."""
    root = tmp_path_factory.mktemp("binary")
    fixtures.write_binary_fixtures(root)
    return root


@pytest.fixture(scope="session")
def expected():
    return fixtures.fixture_data()


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download."""
    def fetch(*args, **kwargs):
        raise AssertionError("download.fetch was called although download=False")

    monkeypatch.setattr(download, "fetch", fetch)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- registry and loading ---------------------------------------------------------


def test_registry_lists_the_four_datasets():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "svhn"]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "digits"])
def test_loads_uint8_images_and_int64_labels(name, split, data_root, no_download):
    data = load_imageset(name, data_root, split)
    assert isinstance(data, ImageSet)
    assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 32, 32)
    assert data.labels.dtype == torch.int64 and data.labels.shape == (len(data),)
    assert 0 <= int(data.labels.min()) and int(data.labels.max()) < NUM_CLASSES[name]
    assert len(data.classes) == NUM_CLASSES[name]
    assert (data.name, data.split) == (name, split)
    assert load_imageset(name, data_root, split).fingerprint == data.fingerprint


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", FILE_DATASETS)
def test_loaded_arrays_equal_what_the_fixtures_wrote(name, split, data_root, expected):
    images, labels = expected[name][split]
    data = load_imageset(name, data_root, split)
    assert np.array_equal(data.images.numpy(), images)
    assert np.array_equal(data.labels.numpy(), labels)


def test_class_names(data_root):
    assert load_imageset("cifar10", data_root).classes == fixtures.CIFAR10_CLASSES
    assert load_imageset("cifar100", data_root).classes == fixtures.CIFAR100_CLASSES
    assert load_imageset("svhn", data_root).classes == [str(d) for d in range(10)]
    assert load_imageset("digits").classes == [str(d) for d in range(10)]


def test_root_defaults_to_poisonbench_data(data_root, monkeypatch):
    monkeypatch.setenv("POISONBENCH_DATA", str(data_root))
    assert load_imageset("svhn").fingerprint == load_imageset("svhn", data_root).fingerprint


def test_svhn_label_10_is_digit_0(data_root, expected):
    raw = scipy.io.loadmat(data_root / "svhn" / "train_32x32.mat")["y"].reshape(-1)
    assert (raw == 10).any() and not (raw == 0).any()
    labels = load_imageset("svhn", data_root, "train").labels.numpy()
    assert np.array_equal(labels, np.where(raw == 10, 0, raw))


def test_fingerprint_changes_when_one_pixel_changes(tmp_path, expected):
    (train_images, train_labels), test = expected["cifar10"]["train"], expected["cifar10"]["test"]
    before = load_imageset("cifar10", _written(tmp_path / "a", train_images, train_labels, test))
    changed = train_images.copy()
    changed[7, 2, 31, 0] ^= 1
    after = load_imageset("cifar10", _written(tmp_path / "b", changed, train_labels, test))
    assert before.fingerprint != after.fingerprint
    relabeled = train_labels.copy()
    relabeled[0] = (relabeled[0] + 1) % 10
    assert load_imageset("cifar10", _written(tmp_path / "c", train_images, relabeled, test)).fingerprint != before.fingerprint


def _written(root: Path, images, labels, test) -> Path:
    fixtures.write_cifar10(root, (images, labels), test)
    return root


# --- CIFAR binary version ---------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_binary_version_equals_python_version(name, split, data_root, binary_root, no_download):
    py = load_imageset(name, data_root, split)
    binary = load_imageset(name, binary_root, split)
    assert torch.equal(py.images, binary.images) and torch.equal(py.labels, binary.labels)
    assert py.classes == binary.classes and py.fingerprint == binary.fingerprint


def test_binary_version_is_preferred_when_both_exist(tmp_path):
    fixtures.write_fixtures(tmp_path, seed=0)
    fixtures.write_binary_fixtures(tmp_path, seed=1)
    images, labels = fixtures.fixture_data(seed=1)["cifar100"]["test"]
    data = load_imageset("cifar100", tmp_path, "test")
    assert np.array_equal(data.images.numpy(), images) and np.array_equal(data.labels.numpy(), labels)


def test_incomplete_binary_version_falls_back_to_python(tmp_path, data_root, expected):
    root = _copy(data_root, tmp_path / "root")
    fixtures.write_binary_fixtures(root, seed=1)
    (root / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    images, _ = expected["cifar10"]["train"]
    assert np.array_equal(load_imageset("cifar10", root, "train").images.numpy(), images)


def test_python3_pickles_load_too(tmp_path, expected):
    # A batch re-pickled by Python 3 (str keys, _codecs-encoded bytes, numpy._core names).
    images, labels = expected["cifar10"]["test"]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {"data": images.reshape(len(images), -1), "labels": labels.tolist(), "batch_label": b"x"}
    for protocol in (2, 4):
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"n"] * 10}, protocol=protocol))
        data = load_imageset("cifar10", tmp_path, "test")
        assert np.array_equal(data.images.numpy(), images) and data.classes == ["n"] * 10


def test_pickle_with_foreign_global_is_refused_without_running_it(tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataFormatError, match="test_batch.*system"):
        load_imageset("cifar10", root, "test")
    assert not marker.exists()


# --- missing files ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, missing",
    [
        ("cifar10", "cifar-10-batches-py/test_batch"),
        ("cifar100", "cifar-100-python/test"),
        ("svhn", "svhn/test_32x32.mat"),
    ],
)
def test_missing_files_name_the_path_and_the_download_command(name, missing, tmp_path, no_download):
    with pytest.raises(DataNotFoundError) as err:
        load_imageset(name, tmp_path, "test")
    message = str(err.value)
    assert str(tmp_path / missing) in message
    assert f"poisonbench data download {name} --data-root {tmp_path}" in message


def test_missing_meta_file_is_reported(tmp_path, data_root, no_download):
    root = _copy(data_root, tmp_path / "root")
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataNotFoundError, match="cifar-100-python/meta"):
        load_imageset("cifar100", root, "train")


def test_download_true_fetches_missing_files(tmp_path, monkeypatch, data_root):
    calls = []

    def fetch(name, root, **kwargs):
        calls.append(name)
        fixtures.write_fixtures(root)

    monkeypatch.setattr(download, "fetch", fetch)
    data = load_imageset("svhn", tmp_path, "test", download=True)
    assert calls == ["svhn"]
    assert data.fingerprint == load_imageset("svhn", data_root, "test").fingerprint
    load_imageset("svhn", tmp_path, "test", download=True)  # present now: no second fetch
    assert calls == ["svhn"]


def test_digits_needs_no_files(tmp_path, no_download):
    assert len(load_imageset("digits", tmp_path / "nowhere", "test")) == 450


# --- corrupted structure ----------------------------------------------------------


def _rewrite_batch(root: Path, rel: str, **changes) -> Path:
    path = root / rel
    batch = cifar.unpickle(path)
    batch.update(changes)
    with open(path, "wb") as f:
        fixtures._Py2Pickler(f, protocol=2).dump(batch)
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"data": np.zeros((4, 100), np.uint8)}, "'data' uint8 (4, 100), expected a uint8 array N×3072"),
        ({"data": np.zeros((4, 3072), np.float32)}, "'data' float32"),
        ({"labels": [3] * 5}, "5 labels for 4 images"),
        ({"labels": [0, 1, 10, 2]}, "label 10, expected labels in 0..9"),
        ({"labels": "abcd"}, "expected a list of integers"),
    ],
)
def test_cifar_python_structure_errors(changes, words, tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    if "data" not in changes:
        changes["data"] = np.zeros((4, 3072), np.uint8)
    if "labels" not in changes:
        changes["labels"] = [0, 1, 2, 3]
    path = _rewrite_batch(root, "cifar-10-batches-py/test_batch", **changes)
    with pytest.raises(DataFormatError) as err:
        load_imageset("cifar10", root, "test")
    assert str(path) in str(err.value) and words in str(err.value)


def test_cifar_meta_with_wrong_class_count(tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    _rewrite_batch(root, "cifar-100-python/meta", fine_label_names=["a"] * 99)
    with pytest.raises(DataFormatError, match="lists 99 names under 'fine_label_names', expected 100"):
        load_imageset("cifar100", root, "test")


@pytest.mark.parametrize("rel", ["cifar-10-batches-py/data_batch_2", "cifar-100-python/train", "cifar-100-python/meta"])
def test_truncated_pickle(rel, tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    path = root / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=str(path)):
        load_imageset("cifar10" if "10-" in rel else "cifar100", root, "train")


def test_cifar_binary_structure_errors(tmp_path, binary_root):
    root = _copy(binary_root, tmp_path / "root")
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[:-5]))
    with pytest.raises(DataFormatError, match=f"{path} has {len(raw) - 5} bytes, expected a positive multiple of 3073"):
        load_imageset("cifar10", root, "test")
    raw[3073] = 10  # the second record's label
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="label 10, expected labels in 0..9"):
        load_imageset("cifar10", root, "test")
    cifar100 = root / "cifar-100-binary" / "test.bin"
    raw = bytearray(cifar100.read_bytes())
    raw[1] = 100  # the first record's fine label; raw[0] is the coarse one
    cifar100.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="label 100, expected labels in 0..99"):
        load_imageset("cifar100", root, "test")
    (root / "cifar-10-batches-bin" / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(DataFormatError, match="lists 2 names, expected 10"):
        load_imageset("cifar10", root, "train")


def _write_mat(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        scipy.io.savemat(f, arrays)
    return path


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"X": np.zeros((32, 32, 4, 5), np.uint8), "y": np.ones((5, 1))}, "'X' uint8 (32, 32, 4, 5), expected uint8 32×32×3×N"),
        ({"X": np.zeros((32, 32, 3, 5), np.float64), "y": np.ones((5, 1))}, "'X' float64"),
        ({"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.ones((4, 1))}, "expected 5 numeric labels"),
        ({"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.array([[1], [2], [11], [3], [4]])}, "label 11, expected integers 1..10"),
        ({"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.array([[1], [0], [2], [3], [4]])}, "label 0, expected integers 1..10"),
        ({"X": np.zeros((32, 32, 3, 5), np.uint8)}, "'y' nothing"),
    ],
)
def test_svhn_structure_errors(arrays, words, tmp_path):
    (tmp_path / "svhn").mkdir()
    path = _write_mat(tmp_path / "svhn" / "test_32x32.mat", **arrays)
    with pytest.raises(DataFormatError) as err:
        load_imageset("svhn", tmp_path, "test")
    assert str(path) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_mat(keep, tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    path = root / "svhn" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(DataFormatError, match=str(path)):
        load_imageset("svhn", root, "train")


def test_svhn_float_labels_load(tmp_path):
    # Labels stored as double (MATLAB's default) are fine when integral.
    (tmp_path / "svhn").mkdir()
    _write_mat(tmp_path / "svhn" / "test_32x32.mat", X=np.zeros((32, 32, 3, 3), np.uint8), y=np.array([[10.0], [1.0], [9.0]]))
    assert load_imageset("svhn", tmp_path, "test").labels.tolist() == [0, 1, 9]


# --- names and splits -------------------------------------------------------------


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        load_imageset("cifar11")
    assert all(n in str(err.value) for n in ["cifar10", "cifar100", "digits", "svhn"])


def test_bad_split_is_a_config_error(data_root):
    with pytest.raises(ConfigError, match="split must be one of train, test, got 'val'"):
        load_imageset("cifar10", data_root, "val")


# --- check and fetch (no network) -------------------------------------------------


def test_check_reports_md5_mismatch_and_missing(tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    (root / "svhn" / "test_32x32.mat").unlink()
    report = dict(download.check("svhn", root))
    assert report == {root / "svhn" / "train_32x32.mat": "md5 mismatch", root / "svhn" / "test_32x32.mat": "missing"}
    statuses = dict(download.check("cifar10", root))
    assert len(statuses) == 7 and set(statuses.values()) == {"md5 mismatch"}


def test_check_on_empty_root_reports_the_python_version_missing(tmp_path):
    report = download.check("cifar100", tmp_path)
    assert [p.name for p, _ in report] == ["train", "test", "meta"]
    assert {s for _, s in report} == {"missing"}


def test_check_binary_version_by_size(tmp_path, binary_root):
    report = dict(download.check("cifar10", binary_root))
    assert report[binary_root / "cifar-10-batches-bin" / "test_batch.bin"] == "size mismatch"
    assert report[binary_root / "cifar-10-batches-bin" / "batches.meta.txt"] == "ok"


def test_check_accepts_a_file_with_the_right_md5(tmp_path, data_root):
    root = _copy(data_root, tmp_path / "root")
    path = root / "svhn" / "test_32x32.mat"
    real = download.Expected("svhn/test_32x32.mat", hashlib.md5(path.read_bytes()).hexdigest())
    assert download.file_status(root, real) == "ok"


def test_check_digits_points_at_the_bundled_file():
    [(path, status)] = download.check("digits", "/nonexistent")
    assert path.name == "digits.csv.gz" and status == "ok"


def test_fetch_rejects_binary_for_svhn_and_is_a_no_op_for_digits(tmp_path):
    with pytest.raises(ConfigError, match="binary version"):
        download.fetch("svhn", tmp_path, binary=True)
    assert download.fetch("digits", tmp_path) == []
    with pytest.raises(ConfigError, match="no download source"):
        download.fetch("mnist", tmp_path)


def _tgz(path: Path, members: dict[str, bytes], symlink: str | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_archive_unpacks_only_expected_regular_files(tmp_path, data_root):
    # A local file:// archive exercises download, md5 and extraction without a network.
    source = download.SOURCES["cifar10"]["python"]
    members = {f"./{e.path}": (data_root / e.path).read_bytes() for e in source.files}
    members["../escape"] = b"x"
    members["cifar-10-batches-py/readme.html"] = b"<html>"
    md5 = _tgz(tmp_path / "a.tar.gz", members, symlink="cifar-10-batches-py/link")
    root = tmp_path / "root"
    archive = download.Archive((tmp_path / "a.tar.gz").as_uri(), md5, source.folder)
    download._fetch_archive(archive, source.files, root)
    assert sorted(p.name for p in (root / source.folder).iterdir()) == sorted(Path(e.path).name for e in source.files)
    assert not (tmp_path / "escape").exists() and [p.name for p in root.iterdir()] == [source.folder]
    assert load_imageset("cifar10", root, "test").fingerprint == load_imageset("cifar10", data_root, "test").fingerprint


def test_archive_with_wrong_md5_leaves_nothing(tmp_path, data_root):
    source = download.SOURCES["cifar10"]["python"]
    _tgz(tmp_path / "a.tar.gz", {e.path: b"" for e in source.files})
    archive = download.Archive((tmp_path / "a.tar.gz").as_uri(), "0" * 32, source.folder)
    root = tmp_path / "root"
    with pytest.raises(DataFormatError, match="expected 00000000"):
        download._fetch_archive(archive, source.files, root)
    assert list(root.iterdir()) == []


def test_archive_without_an_expected_file_is_refused(tmp_path):
    source = download.SOURCES["cifar100"]["python"]
    md5 = _tgz(tmp_path / "a.tar.gz", {"cifar-100-python/train": b"", "cifar-100-python/meta": b""})
    with pytest.raises(DataFormatError, match="does not contain cifar-100-python/test"):
        download._fetch_archive(download.Archive((tmp_path / "a.tar.gz").as_uri(), md5, source.folder), source.files, tmp_path / "root")


def test_unreachable_url_is_data_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="could not download"):
        download._download((tmp_path / "absent.mat").as_uri(), tmp_path / "out.mat", None)
    assert not (tmp_path / "out.mat").exists()


# --- digits -----------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    y = load_digits().target
    split = digits.split_indices(y)
    assert (len(split["train"]), len(split["aux"]), len(split["test"])) == (900, 447, 450)
    assert not set(split["train"]) & set(split["test"]) and not set(split["aux"]) & set(split["train"])
    assert not set(split["aux"]) & set(split["test"])
    assert sorted([*split["train"], *split["aux"], *split["test"]]) == list(range(len(y)))
    for c in range(10):
        total, test = (y == c).sum(), (y[split["test"]] == c).sum()
        assert abs(test - total * digits.TEST_FRACTION) <= 1
    again = digits.split_indices(y)
    assert all(np.array_equal(split[s], again[s]) for s in split)
    train = load_imageset("digits", split="train")
    assert np.array_equal(train.labels.numpy(), y[split["train"]])


def test_digits_pixels():
    data = load_imageset("digits", split="test")
    assert torch.equal(data.images[:, 0], data.images[:, 1]) and torch.equal(data.images[:, 0], data.images[:, 2])
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0
    assert load_imageset("digits", split="test").fingerprint == data.fingerprint


# --- fixtures ---------------------------------------------------------------------


def test_fixture_class_coverage(expected):
    for name in ("cifar10", "svhn"):
        assert np.bincount(expected[name]["train"][1], minlength=10).min() >= 2
    assert np.bincount(expected["cifar100"]["train"][1], minlength=100).min() >= 1
    with pytest.raises(ConfigError, match="n_train >= 10"):
        fixtures.fixture_data(n_train=9)


def test_fixture_pickles_look_like_python2_cifar(data_root):
    raw = (data_root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02}")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
