"""Datasets (MNIST, Fashion-MNIST, CIFAR-10/100) as numpy arrays, and the random training subsets.

The paper (D'Amico, Bocchi, Negri 2025, Sec. 3 and App. E) trains every architecture on "a random subset
of P elements from the training set" for a grid of P and repeats each run several times "varying the
random subset and the initial condition". This module provides the two ingredients that are data, not
model: the full train/test splits (`load`) and the reproducible subsets (`subset_indices`,
`subset_table`). Everything here is host-side numpy; the engine moves the arrays to the device once.

Sources, tried in this order by `load(name, data_dir)` (the first one present wins):

1. **tensorflow-datasets** (optional extra: ``pip install 'jaxnorm[tfds]'``). Used only when a prepared
   copy exists at ``<root>/<tfds name>/<version>/dataset_info.json``, where ``<root>`` is ``data_dir``
   (or ``$JAXNORM_DATA_DIR``), else tfds' own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
   It is read offline (``download=False, try_gcs=False``) once and turned into a numpy cache
   ``<root>/jaxnorm_cache/<name>-<version>.npz`` (raw uint8 pixels); later loads read that cache and
   never import TensorFlow. TensorFlow is imported only when a prepared copy is found.
2. **Local files** in ``data_dir`` (or ``$JAXNORM_DATA_DIR``), first match wins:

   - ``<data_dir>/<name>.npz`` with arrays ``x_train, y_train, x_test, y_test`` (uint8 pixels
     ``[N, H, W]`` or ``[N, H, W, C]``, integer labels);
   - MNIST-format IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (optionally ``.gz``; the
     ``train-images.idx3-ubyte`` spelling is accepted too) in a folder named after the dataset:
     ``<data_dir>/<name>/``, ``<data_dir>/<alias>/`` (``fashion-mnist``, ``FashionMNIST/raw``,
     ``MNIST/raw``), or ``data_dir`` itself when its own name is one of those. MNIST and Fashion-MNIST
     share file names, so a folder whose name says neither is never guessed;
   - CIFAR "python version": the extracted folder ``cifar-10-batches-py`` / ``cifar-100-python`` or the
     tarball ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, in ``data_dir`` or
     ``<data_dir>/<name>/``. CIFAR-100 uses the 100 **fine** labels (``b'fine_labels'``), as tfds'
     ``label`` does; the 20 coarse labels are not used.
3. **Debian's** ``dataset-fashion-mnist`` package (Fashion-MNIST only):
   ``/usr/share/datasets/fashion-mnist/`` (``apt-get install -y dataset-fashion-mnist``). This is the
   embedded default used by the demos, tests and benchmarks.

Missing data never turns into random data: `DataNotFoundError` lists every path tried and the commands
that would provide the data. A source that is present but unreadable raises rather than falling through,
so a broken copy is never silently replaced by another one.

Normalization (``normalization="standardize"``, the default): ``x = (pixel / 255 - mean_c) / std_c`` per
channel c, float32, with fixed constants = the mean and (population) std over all pixels of the 60000 /
50000 training images (`NORMALIZATION`)::

    mnist          mean 0.1307                    std 0.3081
    fashion_mnist  mean 0.2860                    std 0.3530
    cifar10        mean (0.4914, 0.4822, 0.4465)  std (0.2470, 0.2435, 0.2616)
    cifar100       mean (0.5071, 0.4865, 0.4409)  std (0.2673, 0.2564, 0.2762)

Constants rather than statistics recomputed at load time, so that every source (and a truncated npz)
gets the same affine map. ``normalization="unit"`` gives ``pixel / 255`` in [0, 1].

Nothing is ever written inside the package directory; the only file written is the tfds numpy cache in
the tfds data directory.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import operator
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "NORMALIZATIONS",
    "DataNotFoundError",
    "Dataset",
    "load",
    "read_idx",
    "subset_indices",
    "subset_table",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
NORMALIZATIONS = ("standardize", "unit")

#: Environment variable used as the default ``data_dir``.
DATA_DIR_ENV = "JAXNORM_DATA_DIR"
#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Per-channel (mean, std) of pixel/255 over all training pixels. Fashion-MNIST measured here from the
# Debian copy (0.286041, 0.353024); the others are the standard published values (e.g. torchvision
# references), the CIFAR std being the per-pixel one (0.247, ...), not the often copied 0.2023.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_SHAPE = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
_TFDS_NAME = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "cifar100": "cifar100"}
# Folder names under which people commonly keep the IDX files (torchvision uses <Name>/raw).
_IDX_DIRS = {"mnist": ("mnist", "MNIST/raw", "MNIST"), "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST")}
_IDX_FILES = {  # split -> (images, labels) stems
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_URL = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
_CIFAR = {  # name -> (folder inside the tarball, train members, test member, label key)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels"),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels"),
}
_CIFAR_TAR = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


class DataNotFoundError(FileNotFoundError):
    """No source holds the requested dataset; the message lists the paths tried and how to get it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Full train and test splits of one dataset.

    Attributes:
      name: one of `DATASETS`.
      x_train: float32 [N_train, H, W, C], normalized as documented in the module docstring.
      y_train: int32 [N_train], in [0, num_classes).
      x_test: float32 [N_test, H, W, C].
      y_test: int32 [N_test].
      num_classes: K.
      source: where the arrays came from, e.g. ``"idx:/usr/share/datasets/fashion-mnist"``.
      normalization: ``"standardize"`` or ``"unit"``.
      mean, std: per-channel constants used (mean 0, std 1 for ``"unit"``).
    """

    name: str
    x_train: np.ndarray = dataclasses.field(repr=False)
    y_train: np.ndarray = dataclasses.field(repr=False)
    x_test: np.ndarray = dataclasses.field(repr=False)
    y_test: np.ndarray = dataclasses.field(repr=False)
    num_classes: int
    source: str = ""
    normalization: str = "standardize"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one example."""
        return tuple(int(s) for s in self.x_train.shape[1:])


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def load(name: str, data_dir: str | os.PathLike | None = None, *, normalization: str = "standardize") -> Dataset:
    """Loads the full train and test splits of `name` from the first source present.

    Args:
      name: one of `DATASETS` ("mnist", "fashion_mnist", "cifar10", "cifar100").
      data_dir: folder holding prepared tfds data, an ``<name>.npz``, IDX files or the CIFAR files (see the
        module docstring for the layouts). None or "" means ``$JAXNORM_DATA_DIR`` when set, else no local
        folder (tfds' default folder and the Debian package are still tried).
      normalization: "standardize" (per-channel ``(x/255 - mean)/std`` with `NORMALIZATION`) or "unit"
        (``x/255``).

    Returns:
      `Dataset` with x_* float32 [N, H, W, C] and y_* int32 [N].

    Raises:
      ValueError: unknown `name` or `normalization`, or a present source with malformed content.
      DataNotFoundError: no source holds the dataset (the message lists paths tried and remedies), or
        `data_dir` (or ``$JAXNORM_DATA_DIR``) is not an existing folder.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)} (DATASETS)")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
    given = "data_dir"
    if data_dir is None or os.fspath(data_dir) == "":
        data_dir, given = os.environ.get(DATA_DIR_ENV) or None, f"${DATA_DIR_ENV}"
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and not root.is_dir():  # never fall back to another copy behind the user's back
        raise DataNotFoundError(f"dataset {name!r}: {given} {os.fspath(root)!r} (CLIs: --data-dir) is not an existing "
                                f"folder; allowed: "
                                f"a folder holding the data (see jaxnorm.data), or none for the default sources")

    tried: list[str] = []
    for source in (_from_tfds, _from_local, _from_debian):
        found = source(name, root, tried)
        if found is not None:
            arrays, where = found
            return _finish(name, arrays, where, normalization)
    raise DataNotFoundError(_missing_message(name, root, tried))


# --------------------------------------------------------------------------------------------------
# Sources. Each returns ((x_train, y_train, x_test, y_test) raw uint8/int arrays, description) or None,
# appending one line per place it looked to `tried`.
# --------------------------------------------------------------------------------------------------

_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _tfds_root(root: Path | None) -> Path:
    if root is not None:
        return root
    # tfds' own default (tensorflow_datasets/core/constants.py), resolved without importing tfds.
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in v.split("."))


def _from_tfds(name: str, root: Path | None, tried: list[str]) -> tuple[_Raw, str] | None:
    tfds_root = _tfds_root(root)
    ds_dir = tfds_root / _TFDS_NAME[name]
    versions = sorted((p.parent.name for p in ds_dir.glob("*/dataset_info.json")), key=_version_key)
    if not versions:
        tried.append(f"tfds: no prepared copy at {ds_dir}/<version>/dataset_info.json")
        return None
    version = versions[-1]
    cache = tfds_root / "jaxnorm_cache" / f"{name}-{version}.npz"
    if cache.is_file():
        return _read_npz(cache, name), f"tfds-cache:{cache}"
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (optional, heavy: import only when needed)
    except ImportError as e:
        tried.append(f"tfds: prepared copy at {ds_dir}/{version} but tensorflow-datasets is not importable ({e}); "
                     "pip install 'jaxnorm[tfds]'")
        return None
    _hide_gpus_from_tensorflow()
    splits = []
    for split in ("train", "test"):
        ds = tfds.load(f"{_TFDS_NAME[name]}:{version}", split=split, data_dir=os.fspath(tfds_root),
                       download=False, try_gcs=False, as_supervised=True, shuffle_files=False)
        # Batches of 10k rather than batch_size=-1: the latter needs the split size from the metadata.
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(10_000)):
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
        splits += [np.concatenate(xs), np.concatenate(ys)]
    raw = tuple(splits)
    _check_raw(name, raw, f"tfds {ds_dir}/{version}")
    _write_cache(cache, raw)
    return raw, f"tfds:{ds_dir}/{version}"


def _hide_gpus_from_tensorflow() -> None:
    """Keeps TensorFlow off the accelerators so that it does not grab memory JAX needs."""
    try:
        import tensorflow as tf  # noqa: PLC0415

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # noqa: BLE001  (already initialized, or no tf.config: nothing to hide)
        pass


def _write_cache(path: Path, raw: _Raw) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, x_train=raw[0], y_train=raw[1], x_test=raw[2], y_test=raw[3])
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole cache
    except OSError as e:
        warnings.warn(f"could not write the numpy cache {path} ({e}); tfds will be read again next time",
                      stacklevel=3)
        tmp.unlink(missing_ok=True)


def _from_local(name: str, root: Path | None, tried: list[str]) -> tuple[_Raw, str] | None:
    if root is None:
        tried.append(f"local files: no data_dir given and ${DATA_DIR_ENV} is not set")
        return None
    npz = root / f"{name}.npz"
    if npz.is_file():
        return _read_npz(npz, name), f"npz:{npz}"
    tried.append(f"npz: {npz} (absent)")
    if name in _IDX_DIRS:
        for folder in _idx_candidates(name, root):
            files = _idx_files(folder)
            if files is not None:
                return _read_idx_dir(files, name), f"idx:{folder}"
            tried.append(f"IDX: {folder}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] (absent)")
    else:
        folder_name, _, _, _ = _CIFAR[name]
        for base in (root, root / name):
            folder = base / folder_name
            if folder.is_dir():
                return _read_cifar(name, folder), f"cifar-dir:{folder}"
            tried.append(f"CIFAR folder: {folder} (absent)")
            tar = base / _CIFAR_TAR[name]
            if tar.is_file():
                return _read_cifar(name, tar), f"cifar-tar:{tar}"
            tried.append(f"CIFAR tarball: {tar} (absent)")
    return None


def _idx_candidates(name: str, root: Path) -> list[Path]:
    aliases = _IDX_DIRS[name]
    out = [root / a for a in aliases]
    # data_dir may itself be the dataset's folder (e.g. /usr/share/datasets/fashion-mnist); accepted only
    # when its name says which dataset it is, since MNIST and Fashion-MNIST files have the same names.
    names = {Path(a).parts[0].lower() for a in aliases}
    own = (root.parent.name if root.name == "raw" else root.name).lower()
    if own in names:
        out.insert(0, root)
    return out


def _from_debian(name: str, root: Path | None, tried: list[str]) -> tuple[_Raw, str] | None:
    if name != "fashion_mnist":
        tried.append(f"Debian package: none for {name} (only Fashion-MNIST is packaged, as dataset-fashion-mnist)")
        return None
    folder = DEBIAN_FASHION_MNIST_DIR
    files = _idx_files(folder)
    if files is None:
        tried.append(f"Debian dataset-fashion-mnist: {folder}/*-ubyte.gz (absent)")
        return None
    return _read_idx_dir(files, name), f"idx:{folder}"


def _missing_message(name: str, root: Path | None, tried: list[str]) -> str:
    dir_hint = os.fspath(root) if root is not None else "DIR"
    lines = [f"dataset {name!r} was not found. Sources tried, in order:"]
    lines += [f"  - {t}" for t in tried]
    lines += [
        "Any one of these provides it:",
        "  * tfds: pip install 'jaxnorm[tfds]', then on a machine with internet access run",
        f"      python -c \"import tensorflow_datasets as tfds; tfds.load('{_TFDS_NAME[name]}', data_dir='{dir_hint}')\"",
        f"    copy {dir_hint} here and pass data_dir={dir_hint!r} (CLIs: --data-dir {dir_hint}, or "
        f"export {DATA_DIR_ENV}={dir_hint}).",
    ]
    if name in _IDX_DIRS:
        lines.append(f"  * IDX files: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (from {_IDX_URL[name]}) in "
                     f"{dir_hint}/{name}/ and pass --data-dir {dir_hint}.")
    else:
        lines.append(f"  * CIFAR python version: put https://www.cs.toronto.edu/~kriz/{_CIFAR_TAR[name]} (or its "
                     f"extracted {_CIFAR[name][0]}/) in {dir_hint}/ and pass --data-dir {dir_hint}.")
    lines.append(f"  * npz: save x_train, y_train, x_test, y_test (uint8 pixels, int labels) as {dir_hint}/{name}.npz.")
    if name == "fashion_mnist":
        lines.append("  * Debian/Ubuntu: apt-get install -y dataset-fashion-mnist")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (``.gz`` or raw) into an array of its stored dtype and shape.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions d, then d big-endian uint32 sizes and the data, C order.

    Returns:
      array of shape (size_0, ..., size_{d-1}); uint8 files come back as a read-only view of the bytes.

    The content decides, not the name: a gzip stream (magic ``1f 8b``) is decompressed whatever the
    file is called, and a file named ``.gz`` that already holds raw IDX bytes is read as such.

    Raises:
      ValueError: naming the file: not gzip nor IDX (e.g. an HTML error page saved by a failed
        download), a damaged or truncated gzip stream, an unknown type byte, a header cut short, or
        sizes that do not match the data.
    """
    path = Path(path)
    blob = path.read_bytes()
    if blob[:2] == _GZIP_MAGIC:
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise ValueError(f"{path} is a damaged or truncated gzip file ({err}); delete it and download it "
                             f"again") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is neither gzip nor an IDX file ({_sniff(blob)}; expected the bytes 00 00, a type "
                         f"byte in {sorted(hex(k) for k in _IDX_DTYPES)} and ndim)")
    dtype = np.dtype(_IDX_DTYPES[blob[2]])
    ndim = blob[3]
    offset = 4 + 4 * ndim
    if len(blob) < offset:
        raise ValueError(f"{path}: truncated IDX header ({len(blob)} bytes; {ndim} dimensions need {offset})")
    shape = tuple(int(s) for s in np.frombuffer(blob, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(blob) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} of {dtype} ({expected} bytes) but the file holds "
                         f"{len(blob) - offset} data bytes")
    arr = np.frombuffer(blob, dtype, offset=offset).reshape(shape)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"  # .npz files are zip archives


def _sniff(blob: bytes) -> str:
    """A short description of what a file that is not the expected format starts with."""
    head = blob[:64].lstrip().lower()
    if not blob:
        return "the file is empty"
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "it is an HTML/XML page, e.g. the error page of a failed download"
    return f"it starts with {blob[:8].hex(' ')}"


def _idx_files(folder: Path) -> dict[str, Path] | None:
    """Paths of the four IDX files in `folder`, or None when any is missing."""
    if not folder.is_dir():
        return None
    out = {}
    for split, stems in _IDX_FILES.items():
        for kind, stem in zip(("x", "y"), stems):
            dotted = stem.replace("-idx", ".idx")  # Kaggle spelling: train-images.idx3-ubyte
            hit = next((folder / (s + ext) for s in (stem, dotted) for ext in (".gz", "")
                        if (folder / (s + ext)).is_file()), None)
            if hit is None:
                return None
            out[f"{kind}_{split}"] = hit
    return out


def _read_idx_dir(files: dict[str, Path], name: str) -> _Raw:
    try:
        raw = tuple(read_idx(files[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    except ValueError as err:
        hint = f"delete the file and download a good copy from {_IDX_URL[name]}"
        if files["x_train"].parent == DEBIAN_FASHION_MNIST_DIR:
            hint = "reinstall it: apt-get install --reinstall dataset-fashion-mnist"
        raise ValueError(f"{err}. To fix: {hint} (gunzip -t FILE checks a .gz)") from None
    _check_raw(name, raw, f"IDX files in {files['x_train'].parent}")
    return raw


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: the CIFAR files are pickles of dicts of lists, bytes and
    one uint8 array, and loading arbitrary pickles from a data folder would execute arbitrary code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module, name):
        # _codecs.encode: how Python 3 writes bytes under protocol 2 (re-pickled copies of the files).
        if (module.split(".")[0] == "numpy" and name in self._ALLOWED) or (module, name) == ("_codecs", "encode"):
            if module.startswith("numpy.core.") and hasattr(np, "_core"):  # the originals name numpy.core,
                module = "numpy._core." + module[len("numpy.core."):]  # a deprecated alias in numpy 2
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _unpickle_cifar(blob: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR "python version" batch -> (images uint8 [N, 32, 32, 3], labels [N])."""
    d = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()  # keys are bytes (Python 2 pickles)
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise ValueError(f"{where}: CIFAR batch without 'data' and {label_key!r} (keys: {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{where}: CIFAR 'data' has shape {data.shape}; expected [N, 3072]")
    # Each row: 1024 red, 1024 green, 1024 blue values, each a 32x32 image in row-major order.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(d[label_key])


def _read_cifar(name: str, path: Path) -> _Raw:
    """Reads the CIFAR-10/100 python version from its extracted folder or from the .tar.gz."""
    folder, train_members, test_member, label_key = _CIFAR[name]
    if path.is_dir():
        def read(member):
            f = path / member
            if not f.is_file():
                raise ValueError(f"{path} lacks {member} (expected {', '.join(train_members + (test_member,))})")
            return f.read_bytes()
        parts = [_unpickle_cifar(read(m), f"{path}/{m}", label_key) for m in train_members + (test_member,)]
    else:
        with tarfile.open(path, "r:*") as tar:
            def read(member):
                try:
                    return tar.extractfile(f"{folder}/{member}").read()
                except KeyError:
                    raise ValueError(f"{path} lacks {folder}/{member}") from None
            parts = [_unpickle_cifar(read(m), f"{path}:{folder}/{m}", label_key)
                     for m in train_members + (test_member,)]
    train, test = parts[:-1], parts[-1]
    raw = (np.concatenate([p[0] for p in train]), np.concatenate([p[1] for p in train]), test[0], test[1])
    _check_raw(name, raw, os.fspath(path))
    return raw


def _read_npz(path: Path, name: str) -> _Raw:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(_ZIP_MAGIC):  # np.load would blame allow_pickle for any non-zip file
        raise ValueError(f"{path} is not a .npz (zip) archive ({_sniff(head)}); write it with "
                         f"numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is a damaged .npz archive ({err}); write it again with numpy.savez "
                             f"(a jaxnorm_cache file: delete it, it is rebuilt from tfds)") from None
    with z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}; it must hold x_train, y_train, x_test, y_test")
        try:
            raw = (z["x_train"], z["y_train"], z["x_test"], z["y_test"])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
            raise ValueError(f"{path} is a damaged .npz archive ({err}); write it again with numpy.savez "
                             f"(a jaxnorm_cache file: delete it, it is rebuilt from tfds)") from None
    _check_raw(name, raw, os.fspath(path))
    return raw


def _check_raw(name: str, raw: _Raw, where: str) -> None:
    """Validates raw arrays: uint8 pixels of the dataset's shape, integer labels in range, matching N."""
    h, w, c = _SHAPE[name]
    k = _NUM_CLASSES[name]
    for split, x, y in (("train", raw[0], raw[1]), ("test", raw[2], raw[3])):
        if x.dtype != np.uint8:
            raise ValueError(f"{where}: x_{split} has dtype {x.dtype}; expected uint8 pixels in 0..255")
        if x.shape[1:] not in ((h, w, c), (h, w)) or (x.ndim == 3 and c != 1):
            raise ValueError(f"{where}: x_{split} has shape {x.shape}; expected [N, {h}, {w}, {c}]"
                             + (f" or [N, {h}, {w}]" if c == 1 else ""))
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{where}: y_{split} has shape {y.shape} and dtype {y.dtype}; expected integer "
                             f"labels of shape [{x.shape[0]}]")
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"{where}: y_{split} has labels in [{y.min()}, {y.max()}]; {name} has {k} classes")


def _finish(name: str, raw: _Raw, where: str, normalization: str) -> Dataset:
    h, w, c = _SHAPE[name]
    if normalization == "standardize":
        mean, std = NORMALIZATION[name]
    else:
        mean, std = (0.0,) * c, (1.0,) * c
    # Affine map in float32, fused as x * (1 / (255 std)) - mean / std: two in-place passes (~0.05 s for
    # Fashion-MNIST's train split; a per-value lookup table was 10x slower because of the index cast).
    scale = np.asarray([1.0 / (255.0 * sd) for sd in std], dtype=np.float32)
    shift = np.asarray([m / sd for m, sd in zip(mean, std)], dtype=np.float32)

    def images(x):
        out = x.reshape(x.shape[0], h, w, c).astype(np.float32)
        out *= scale
        out -= shift
        return out

    return Dataset(name=name, x_train=images(raw[0]), y_train=raw[1].astype(np.int32),
                   x_test=images(raw[2]), y_test=raw[3].astype(np.int32), num_classes=_NUM_CLASSES[name],
                   source=where, normalization=normalization, mean=tuple(mean), std=tuple(std))


# --------------------------------------------------------------------------------------------------
# Random training subsets
# --------------------------------------------------------------------------------------------------


def _as_int(value, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _permutation(seed: int, repetition: int, n_train: int) -> np.ndarray:
    # numpy's SeedSequence hashes the whole entropy tuple, so (seed, repetition) pairs give independent
    # streams (no seed+repetition collisions), and any repetition can be redrawn alone.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, repetition])))
    return rng.permutation(n_train)


def _check_subset_args(seed, repetition, P, n_train) -> tuple[int, int, int, int]:
    seed = _as_int(seed, "seed")
    repetition = _as_int(repetition, "repetition")
    P = _as_int(P, "P")
    n_train = _as_int(n_train, "n_train")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if repetition < 0:
        raise ValueError(f"repetition must be >= 0, got {repetition}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if not 1 <= P <= n_train:
        raise ValueError(f"subset size P={P} is outside the allowed range 1 <= P <= n_train={n_train}")
    return seed, repetition, P, n_train


def subset_indices(seed: int, repetition: int, P: int, n_train: int) -> np.ndarray:
    """Indices of the random training subset of size P for one repetition.

    The subset is the first P entries of one random permutation of ``range(n_train)`` drawn from
    ``np.random.Generator(PCG64(SeedSequence([seed, repetition])))``. Consequences:

    * each subset is a uniformly random P-subset without duplicates, as in the paper (App. E: "we select a
      random subset of P elements from training set");
    * **nested across P**: for a fixed (seed, repetition), the subset of size P is a prefix of the subset of
      any larger P. The paper redraws the subset with each repetition; nesting keeps that marginal law and
      uses common random numbers across P, so the differences along a learning curve reflect P, not the
      luck of the draw. Points of one repetition at different P are therefore correlated: resample whole
      repetitions (not single points) when bootstrapping over seeds;
    * different repetitions (or seeds) give independent subsets; the model initialization is a separate key.

    Args:
      seed: sweep seed, >= 0.
      repetition: repetition index r >= 0 (the paper's "we repeat the training a number of times varying
        the random subset"); every replica of the same repetition shares the permutation, whatever its P.
      P: subset size, 1 <= P <= n_train.
      n_train: size of the full training split.

    Returns:
      int32 [P], distinct indices in [0, n_train), in the permutation's (random) order.
    """
    seed, repetition, P, n_train = _check_subset_args(seed, repetition, P, n_train)
    return _permutation(seed, repetition, n_train)[:P].astype(np.int32)


def subset_table(
    seed: int,
    repetitions: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    n_train: int,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Subset indices of R replicas as one padded table (the engine's static-shape `idx: int32[R, P_max]`).

    Row r holds ``subset_indices(seed, repetitions[r], sizes[r], n_train)`` in its first ``sizes[r]``
    entries; the remaining entries repeat that subset cyclically (``np.resize``), so they are valid indices
    and, should a mask ever be missed, they only reweight the replica's own examples, never add unseen ones.

    Args:
      seed: sweep seed, >= 0.
      repetitions: int [R] repetition index of each replica (scalars broadcast against `sizes`).
      sizes: int [R] subset size P of each replica, each in [1, n_train].
      n_train: size of the full training split.
      pad_to: row length P_max; defaults to max(sizes); must be >= max(sizes).

    Returns:
      (idx int32 [R, P_max], sizes int32 [R]).
    """
    reps, ps = np.broadcast_arrays(np.atleast_1d(np.asarray(repetitions)), np.atleast_1d(np.asarray(sizes)))
    if reps.ndim != 1:
        raise ValueError(f"repetitions and sizes must be 1-D (or scalars), got shapes {reps.shape}")
    if reps.size == 0:
        raise ValueError("subset_table needs at least one replica (got empty repetitions/sizes)")
    checked = [_check_subset_args(seed, r, p, n_train) for r, p in zip(reps.tolist(), ps.tolist())]
    sizes_out = np.array([c[2] for c in checked], dtype=np.int32)
    p_max = int(sizes_out.max())
    if pad_to is not None:
        pad_to = _as_int(pad_to, "pad_to")
        if pad_to < p_max:
            raise ValueError(f"pad_to={pad_to} is smaller than the largest subset size {p_max}")
        p_max = pad_to
    idx = np.empty((len(checked), p_max), dtype=np.int32)
    perms: dict[int, np.ndarray] = {}  # one permutation per repetition, shared by all its sizes
    for row, (s, r, p, n) in enumerate(checked):
        if r not in perms:
            perms[r] = _permutation(s, r, n).astype(np.int32)
        idx[row] = np.resize(perms[r][:p], p_max)
    return idx, sizes_out
