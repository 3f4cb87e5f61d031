"""Tests of jaxnorm.data: real Fashion-MNIST, the file-format parsers, tfds (mocked), subsets."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from jaxnorm import data

HAS_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorflow_datasets") is not None
DEBIAN = data.DEBIAN_FASHION_MNIST_DIR


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test may see the user's $JAXNORM_DATA_DIR or ~/tensorflow_datasets."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", os.fspath(tmp_path_factory.mktemp("tfds_default_empty")))


# --------------------------------------------------------------------------------------------------
# Writers of the genuine formats (independent of the parsers under test)
# --------------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, type_byte: int = 0x08, dtype: str = ">u1") -> None:
    """IDX as specified on yann.lecun.com: 0x0000, type byte, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = header + np.ascontiguousarray(arr, dtype=dtype).tobytes()
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def write_mnist_dir(folder: Path, rng, n_train=5, n_test=3, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    write_idx(folder / f"train-images-idx3-ubyte{ext}", arrays["x_train"])
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", arrays["y_train"])
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", arrays["x_test"])
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", arrays["y_test"])
    return arrays


def cifar_pixel(i, h, w, c):
    """A value that differs between images, rows, columns and channels (mod 256)."""
    return (31 * i + 7 * h + 3 * w + 101 * c) % 256


def cifar_rows(first: int, n: int) -> np.ndarray:
    """Rows in the documented CIFAR layout: byte c*1024 + h*32 + w holds channel c (R,G,B) at (h, w)."""
    rows = np.zeros((n, 3072), np.uint8)
    i, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    rows[i, c * 1024 + h * 32 + w] = cifar_pixel(first + i, h, w, c)
    return rows


def cifar_batch(first: int, n: int, cifar100: bool) -> bytes:
    """One batch pickled like the originals (Python 2 era: protocol 2, bytes keys)."""
    d = {b"batch_label": b"batch", b"data": cifar_rows(first, n),
         b"filenames": [b"img_%d.png" % (first + k) for k in range(n)]}
    if cifar100:
        d[b"fine_labels"] = [(first + k) % 100 for k in range(n)]
        d[b"coarse_labels"] = [(first + k) % 20 + 1000 for k in range(n)]  # out of range: must be unused
    else:
        d[b"labels"] = [(first + k) % 10 for k in range(n)]
    # The originals were written by Python 2 with numpy 1.x, which names numpy.core.multiarray._reconstruct.
    return pickle.dumps(d, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(base: Path, name: str, per_batch=3, n_test=4, tarball=False) -> Path:
    folder, train_members, test_member, _ = data._CIFAR[name]
    members, first = {}, 0
    for m in train_members:
        members[m] = cifar_batch(first, per_batch, name == "cifar100")
        first += per_batch
    members[test_member] = cifar_batch(1000, n_test, name == "cifar100")
    base.mkdir(parents=True, exist_ok=True)
    if tarball:
        path = base / data._CIFAR_TAR[name]
        with tarfile.open(path, "w:gz") as tar:
            for m, blob in members.items():
                info = tarfile.TarInfo(f"{folder}/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return path
    (base / folder).mkdir()
    for m, blob in members.items():
        (base / folder / m).write_bytes(blob)
    return base / folder


# --------------------------------------------------------------------------------------------------
# Real Fashion-MNIST (Debian's dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------------

needs_debian = pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"{DEBIAN} absent: apt-get install -y dataset-fashion-mnist")


@pytest.fixture(scope="module")
def fashion():
    return data.load("fashion_mnist")


@needs_debian
def test_fashion_mnist_has_the_published_sizes_and_balanced_classes(fashion):
    assert fashion.source == f"idx:{DEBIAN}"
    assert fashion.x_train.shape == (60000, 28, 28, 1) and fashion.x_test.shape == (10000, 28, 28, 1)
    assert fashion.x_train.dtype == np.float32 and fashion.y_train.dtype == np.int32
    assert fashion.num_classes == 10 and fashion.input_shape == (28, 28, 1) and fashion.n_train == 60000
    # Zalando's Fashion-MNIST is exactly balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(fashion.y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fashion.y_test, minlength=10), [1000] * 10)
    # First training labels as printed in the Fashion-MNIST tutorials (ankle boot, T-shirt, T-shirt, dress...).
    np.testing.assert_array_equal(fashion.y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])


@needs_debian
def test_fashion_mnist_standardization_uses_the_documented_constants(fashion):
    assert (fashion.mean, fashion.std) == ((0.2860,), (0.3530,))
    # The constants are the train-pixel mean/std (0.286041, 0.353024) rounded to 4 decimals, so the
    # standardized train split has mean 0 and std 1 up to 0.00005/0.353 = 1.4e-4; 5e-4 leaves margin for
    # float32 accumulation over 47M values (done in float64 here).
    x = fashion.x_train
    assert abs(x.mean(dtype=np.float64)) < 5e-4 and abs(x.std(dtype=np.float64) - 1.0) < 5e-4
    # Exact affine map of the 256 pixel levels: min and max are the images of pixels 0 and 255.
    assert np.isclose(x.min(), -0.2860 / 0.3530, atol=1e-6) and np.isclose(x.max(), (1 - 0.2860) / 0.3530, atol=1e-6)


@needs_debian
def test_unit_normalization_is_pixels_over_255(fashion):
    unit = data.load("fashion_mnist", normalization="unit")
    assert unit.x_train.min() == 0.0 and unit.x_train.max() == 1.0
    # Every value is k/255 for an integer k (float32 rounding: 1e-4 << 1/255 spacing).
    k = unit.x_test * 255.0
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    # standardize == (unit - mean) / std, to float32 rounding of values of magnitude <= 2.1.
    np.testing.assert_allclose(fashion.x_test, (unit.x_test - 0.2860) / 0.3530, atol=2e-6)


def test_debian_dir_passed_as_data_dir_is_recognised_by_its_name(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = write_mnist_dir(tmp_path / "fashion-mnist", rng)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    ds = data.load("fashion_mnist", data_dir=tmp_path / "fashion-mnist")
    assert ds.source == f"idx:{tmp_path / 'fashion-mnist'}"
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


# --------------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_roundtrips_uint8_images_and_labels(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 4).astype(np.uint8)
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lab{suffix}", labels)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"img{suffix}"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"lab{suffix}"), labels)


@pytest.mark.parametrize("type_byte,dtype", [(0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_decodes_big_endian_types(tmp_path, type_byte, dtype):
    arr = np.array([[1, -2, 300], [-40000 % 30000, 5, 6]]).astype(dtype)
    write_idx(tmp_path / "a", arr, type_byte, dtype)
    out = data.read_idx(tmp_path / "a")
    assert out.dtype.isnative and out.shape == (2, 3)
    np.testing.assert_array_equal(out, arr.astype(np.dtype(dtype).newbyteorder("=")))


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="neither gzip nor an IDX file"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((3, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*11 data bytes"):
        data.read_idx(tmp_path / "short")


def test_truncated_idx_header_names_the_file(tmp_path):
    (tmp_path / "hdr").write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x05")  # 3 dims, 1 size given
    with pytest.raises(ValueError, match=f"{tmp_path / 'hdr'}: truncated IDX header \\(8 bytes; 3 dimensions need 16\\)"):
        data.read_idx(tmp_path / "hdr")


def test_idx_format_is_decided_by_magic_bytes_not_by_name(tmp_path):
    # A file already gunzipped but still called .gz is valid IDX; a gzip stream without .gz is decompressed.
    arrays = write_mnist_dir(tmp_path / "raw", np.random.default_rng(7), gz=False)
    (tmp_path / "mnist").mkdir()
    for f in (tmp_path / "raw").iterdir():
        blob = f.read_bytes()
        if f.name.startswith("train"):
            (tmp_path / "mnist" / (f.name + ".gz")).write_bytes(blob)  # named .gz, not compressed
        else:
            (tmp_path / "mnist" / f.name).write_bytes(gzip.compress(blob))  # compressed, no .gz
    ds = data.load("mnist", data_dir=tmp_path, normalization="unit")
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    np.testing.assert_allclose(ds.x_test[..., 0] * 255, arrays["x_test"], atol=1e-4)


@pytest.mark.parametrize("damage, match", [
    (lambda blob: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML/XML page"),
    (lambda blob: gzip.compress(blob)[:200], "damaged or truncated gzip file"),
    (lambda blob: b"", "the file is empty"),
])
def test_bad_download_names_the_file_and_how_to_get_a_good_copy(tmp_path, damage, match):
    write_mnist_dir(tmp_path / "mnist", np.random.default_rng(8), gz=True)
    bad = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(damage(gzip.decompress(bad.read_bytes())))
    with pytest.raises(ValueError) as exc:
        data.load("mnist", data_dir=tmp_path)
    msg = str(exc.value)
    assert msg.startswith(str(bad)) and match in msg, msg
    assert "download a good copy from https://storage.googleapis.com/cvdf-datasets/mnist/" in msg


def test_data_dir_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    with pytest.raises(data.DataNotFoundError, match="data_dir '/nonexistent' .* is not an existing folder"):
        data.load("fashion_mnist", data_dir="/nonexistent")  # the Debian copy is installed, and not used
    monkeypatch.setenv(data.DATA_DIR_ENV, os.fspath(tmp_path / "gone"))
    with pytest.raises(data.DataNotFoundError, match=r"\$JAXNORM_DATA_DIR .*gone"):
        data.load("fashion_mnist")


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_idx_folder(tmp_path, gz):
    arrays = write_mnist_dir(tmp_path / "mnist", np.random.default_rng(2), gz=gz)
    ds = data.load("mnist", data_dir=tmp_path)
    assert ds.source == f"idx:{tmp_path / 'mnist'}"
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    expected = (arrays["x_train"][..., None] / 255.0 - 0.1307) / 0.3081  # documented MNIST constants
    np.testing.assert_allclose(ds.x_train, expected, atol=2e-6)  # float32 rounding of |x| <= 2.9
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert ds.y_train.dtype == np.int32


def test_torchvision_layout_and_kaggle_file_names_are_found(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    arrays = write_mnist_dir(folder, np.random.default_rng(3), gz=False)
    for f in folder.iterdir():  # Kaggle spelling: train-images.idx3-ubyte
        f.rename(folder / f.name.replace("-idx", ".idx"))
    ds = data.load("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def test_idx_folder_with_a_neutral_name_is_not_guessed(tmp_path, monkeypatch):
    # MNIST and Fashion-MNIST have identical file names: a folder called "mydata" could hold either.
    write_mnist_dir(tmp_path / "mydata", np.random.default_rng(4))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DataNotFoundError, match="mydata/mnist/"):
        data.load("mnist", data_dir=tmp_path / "mydata")


def test_fashion_idx_folder_is_not_taken_for_mnist(tmp_path):
    write_mnist_dir(tmp_path / "fashion-mnist", np.random.default_rng(5))
    with pytest.raises(data.DataNotFoundError):
        data.load("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("tarball", [True, False])
def test_cifar_python_version_pixel_layout_and_labels(tmp_path, name, tarball):
    path = write_cifar(tmp_path, name, tarball=tarball)
    ds = data.load(name, data_dir=tmp_path, normalization="unit")
    assert ds.source == f"{'cifar-tar' if tarball else 'cifar-dir'}:{path}"
    n_train = 15 if name == "cifar10" else 3  # 5 batches of 3, or one train file of 3
    assert ds.x_train.shape == (n_train, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    assert ds.num_classes == (10 if name == "cifar10" else 100)
    # HWC image: x[i, h, w, c] must be the byte written at c*1024 + h*32 + w of row i.
    i, h, w, c = np.indices(ds.x_train.shape)
    np.testing.assert_array_equal(np.round(ds.x_train * 255).astype(int), cifar_pixel(i, h, w, c))
    i, h, w, c = np.indices(ds.x_test.shape)
    np.testing.assert_array_equal(np.round(ds.x_test * 255).astype(int), cifar_pixel(1000 + i, h, w, c))
    k = ds.num_classes  # CIFAR-100: the fine labels; the coarse ones (>= 1000 here) would fail the range check
    np.testing.assert_array_equal(ds.y_train, np.arange(n_train) % k)
    np.testing.assert_array_equal(ds.y_test, (1000 + np.arange(4)) % k)


def test_cifar_standardization_constants_per_channel(tmp_path):
    write_cifar(tmp_path, "cifar10")
    ds = data.load("cifar10", data_dir=tmp_path)
    raw = cifar_pixel(*np.indices(ds.x_train.shape)) / 255.0
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    np.testing.assert_allclose(ds.x_train, (raw - mean) / std, atol=2e-6)  # float32 rounding, |x| <= 2.1


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = write_cifar(tmp_path, "cifar100")
    (folder / "test").write_bytes(pickle.dumps({b"data": Evil(), b"fine_labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load("cifar100", data_dir=tmp_path)


def test_incomplete_cifar_folder_raises_naming_the_missing_batch(tmp_path):
    folder = write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# npz and environment variable
# --------------------------------------------------------------------------------------------------


def test_npz_source_and_env_var_default(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    x_tr = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)  # [N, H, W] accepted for 1 channel
    x_te = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=np.arange(6), x_test=x_te, y_test=np.array([3, 9]))
    monkeypatch.setenv(data.DATA_DIR_ENV, os.fspath(tmp_path))
    assert data.load("mnist", data_dir="").source == f"npz:{tmp_path / 'mnist.npz'}"  # "" = unset (configs)
    ds = data.load("mnist")
    assert ds.source == f"npz:{tmp_path / 'mnist.npz'}"
    np.testing.assert_allclose(ds.x_train[..., 0], (x_tr / 255.0 - 0.1307) / 0.3081, atol=2e-6)
    np.testing.assert_array_equal(ds.y_test, [3, 9])


@pytest.mark.parametrize("bad,match", [
    (dict(x_train=np.zeros((2, 28, 28), np.float32)), "dtype float32; expected uint8"),
    (dict(x_train=np.zeros((2, 32, 32, 3), np.uint8)), r"shape \(2, 32, 32, 3\); expected \[N, 28, 28, 1\]"),
    (dict(y_train=np.array([0, 10])), r"labels in \[0, 10\]; mnist has 10 classes"),
])
def test_malformed_npz_raises_rather_than_falling_back(tmp_path, bad, match):
    arrays = dict(x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.array([0, 1]),
                  x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.array([0]))
    arrays.update(bad)
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        data.load("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("cut, match", [(None, "is not a .npz \\(zip\\) archive"), (300, "is a damaged .npz archive")])
def test_corrupt_npz_names_the_file_instead_of_blaming_allow_pickle(tmp_path, cut, match):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.array([0, 1]),
             x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.array([0]))
    blob = (tmp_path / "mnist.npz").read_bytes()
    (tmp_path / "mnist.npz").write_bytes(b"\x93NUMPY garbage" + blob if cut is None else blob[:cut])
    with pytest.raises(ValueError, match=match) as exc:
        data.load("mnist", data_dir=tmp_path)
    assert str(tmp_path / "mnist.npz") in str(exc.value) and "allow_pickle" not in str(exc.value)


# --------------------------------------------------------------------------------------------------
# Missing data and bad names
# --------------------------------------------------------------------------------------------------


def test_missing_data_lists_sources_and_remedies_never_random(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(data.DataNotFoundError) as err:
        data.load("fashion_mnist", data_dir=tmp_path)
    msg = str(err.value)
    for needle in [f"{tmp_path}/fashion_mnist/<version>/dataset_info.json", f"{tmp_path}/fashion_mnist.npz",
                   f"{tmp_path}/fashion-mnist/", f"{tmp_path}/no-debian",
                   "pip install 'jaxnorm[tfds]'", "tfds.load('fashion_mnist', data_dir=",
                   f"--data-dir {tmp_path}", "apt-get install -y dataset-fashion-mnist"]:
        assert needle in msg, needle
    with pytest.raises(data.DataNotFoundError, match=r"cifar-100-python\.tar\.gz"):
        data.load("cifar100", data_dir=tmp_path)


def test_unknown_names_raise_value_error_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="'svhn'.*mnist, fashion_mnist, cifar10, cifar100"):
        data.load("svhn")
    with pytest.raises(ValueError, match="'zscore'.*standardize, unit"):
        data.load("mnist", normalization="zscore")


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets (mocked records; needs TensorFlow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TF, reason="tensorflow / tensorflow-datasets not importable: pip install 'jaxnorm[tfds]'")
@pytest.mark.parametrize("name,version,shape,k", [("mnist", "3.0.1", (28, 28, 1), 10),
                                                  ("cifar100", "3.0.2", (32, 32, 3), 100)])
def test_tfds_source_builds_a_numpy_cache_read_without_tensorflow(tmp_path, name, version, shape, k):
    import tensorflow_datasets as tfds

    # A prepared copy is detected by its metadata file; mock_data then replaces the records (USE_CODE:
    # random examples from the builder's feature spec, `num_examples` per split).
    (tmp_path / name / version).mkdir(parents=True)
    (tmp_path / name / version / "dataset_info.json").write_text("{}")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load(name, data_dir=tmp_path)
    assert ds.source == f"tfds:{tmp_path / name / version}"
    assert ds.x_train.shape == (12, *shape) and ds.x_test.shape == (12, *shape) and ds.num_classes == k
    assert ds.y_train.dtype == np.int32 and 0 <= ds.y_train.min() and ds.y_train.max() < k
    cache = tmp_path / "jaxnorm_cache" / f"{name}-{version}.npz"
    assert cache.is_file()

    # Second load, in a fresh interpreter: served from the cache, TensorFlow never imported.
    code = (f"import sys, numpy as np; from jaxnorm import data; d = data.load({name!r}, {os.fspath(tmp_path)!r}); "
            "print(d.source, 'tensorflow' in sys.modules); np.save(sys.argv[1], d.x_train)")
    out = subprocess.run([sys.executable, "-c", code, os.fspath(tmp_path / "x.npy")], capture_output=True,
                         text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == [f"tfds-cache:{cache}", "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), ds.x_train)


# --------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------


def test_subset_is_reproducible_distinct_and_in_range():
    a = data.subset_indices(seed=3, repetition=2, P=500, n_train=1000)
    b = data.subset_indices(3, 2, 500, 1000)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int32 and a.shape == (500,)
    assert len(np.unique(a)) == 500 and a.min() >= 0 and a.max() < 1000
    # Documented recipe, so any tool can redraw a replica's subset.
    ref = np.random.default_rng(np.random.SeedSequence([3, 2])).permutation(1000)[:500]
    np.testing.assert_array_equal(a, ref)
    assert len(data.subset_indices(0, 0, 1000, 1000)) == 1000  # P = n_train: the whole set


def test_subsets_differ_across_seeds_and_repetitions():
    base = set(data.subset_indices(0, 0, 100, 60000).tolist())
    for seed, rep in [(1, 0), (0, 1), (1, 1)]:
        other = set(data.subset_indices(seed, rep, 100, 60000).tolist())
        # Two independent 100-subsets of 60000 share 100*100/60000 = 0.17 elements on average; 10 would be a
        # >10-sigma event for independent draws.
        assert len(base & other) < 10, (seed, rep)


def test_subsets_of_one_repetition_are_nested_across_P():
    big = data.subset_indices(7, 4, 48000, 60000)
    for P in (89, 188, 375, 750, 1500, 3000, 24000):  # the paper's MNIST grid (App. E)
        np.testing.assert_array_equal(data.subset_indices(7, 4, P, 60000), big[:P])


def test_subset_inclusion_is_uniform():
    # Inclusion count of each of 20 indices in 4000 draws of P=5: Binomial(4000, 1/4), mean 1000, sd 27.4.
    # A 6-sd band (+-165) fails by chance with probability ~1e-8 per index.
    counts = np.bincount(np.concatenate([data.subset_indices(0, r, 5, 20) for r in range(4000)]), minlength=20)
    assert np.all(np.abs(counts - 1000) < 165), counts


@pytest.mark.parametrize("P,match", [(0, "P=0 .* 1 <= P <= n_train=100"), (101, "P=101 .* n_train=100"),
                                     (2.5, "P must be an integer, got 2.5")])
def test_bad_subset_size_raises_naming_values(P, match):
    with pytest.raises(ValueError, match=match):
        data.subset_indices(0, 0, P, 100)


def test_bad_seed_and_repetition_raise():
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        data.subset_indices(-1, 0, 5, 10)
    with pytest.raises(ValueError, match="repetition must be >= 0, got -2"):
        data.subset_indices(0, -2, 5, 10)


def test_subset_table_rows_are_the_subsets_padded_cyclically():
    reps, sizes = [0, 0, 3, 1], [4, 9, 1, 6]
    idx, out_sizes = data.subset_table(11, reps, sizes, 50)
    assert idx.dtype == np.int32 and idx.shape == (4, 9) and out_sizes.dtype == np.int32
    np.testing.assert_array_equal(out_sizes, sizes)
    for r, (rep, P) in enumerate(zip(reps, sizes)):
        sub = data.subset_indices(11, rep, P, 50)
        np.testing.assert_array_equal(idx[r, :P], sub)
        # Padding: valid indices from the replica's own subset, in cyclic order.
        np.testing.assert_array_equal(idx[r], [sub[j % P] for j in range(9)])


def test_subset_table_pad_to_and_broadcast():
    idx, sizes = data.subset_table(0, 2, [3, 5], 10, pad_to=8)
    assert idx.shape == (2, 8)
    np.testing.assert_array_equal(idx[0, :3], idx[1, :3])  # same repetition: nested prefixes
    with pytest.raises(ValueError, match="pad_to=4 is smaller than the largest subset size 5"):
        data.subset_table(0, 2, [3, 5], 10, pad_to=4)
    with pytest.raises(ValueError, match="P=11"):
        data.subset_table(0, [0, 1], [3, 11], 10)
