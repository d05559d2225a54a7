"""Datasets as tensors on the training device, and a seeded batch loader with augmentation.

Every dataset is loaded whole into four tensors (airbench style: the data lives on the device,
augmentation runs per batch on tensors, no worker processes). Images are float32, normalised
with the dataset's fixed mean/std, shape (N, C, H, W); labels are int64. No network access is
ever required: files are looked up locally and downloaded (checksum-verified) only on request.

>>> from qtrain.data import load_dataset
>>> ds = load_dataset("synthetic", shape=(1, 8, 8), size=64, test_size=16, num_classes=4)
>>> ds.input_shape, ds.num_train, ds.num_test
((1, 8, 8), 64, 16)
>>> loader = ds.train_loader(16, seed=0)
>>> len(loader), [tuple(x.shape) for x, _ in loader.epoch(0)][0]
(4, (16, 1, 8, 8))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import sysconfig
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qtrain.validation import matches, refuse

try:
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

__all__ = [
    "DATASETS",
    "Augment",
    "ChecksumError",
    "DataFormatError",
    "Dataset",
    "DatasetNotFoundError",
    "DownloadError",
    "Loader",
    "RestrictedUnpickler",
    "dataset_search_dirs",
    "load_dataset",
    "read_idx",
    "verify_sha256",
]

DATA_ENV_VAR = "QTRAIN_DATA"
DEBIAN_DATASETS_DIR = Path("/usr/share/datasets")
TEXT_TEST_FRACTION = 0.1


class DatasetNotFoundError(FileNotFoundError):
    """No searched directory holds the dataset; the message lists them and how to get it."""


class DataFormatError(ValueError):
    """A data file is corrupt, truncated, or not the kind of file expected."""


class ChecksumError(ValueError):
    """A file's SHA-256 digest differs from the published one."""


class DownloadError(OSError):
    """Every mirror of a file failed (network error or checksum mismatch)."""


# ---------------------------------------------------------------------------------------------
# Dataset and loader
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq on tensors would be elementwise, not a bool
class Dataset:
    """A train/test split held as tensors.

    Attributes:
        train_x, test_x: images (N, C, H, W) float32 normalised, or byte ids (N, seq_len) int64.
        train_y, test_y: class ids (N,) int64, or next-byte ids (N, seq_len) int64 for text.
        num_classes: number of classes (256 for byte-level text).
        name: registry name of the dataset.
        default_augment: the dataset's usual training augmentation (None: none), used when
            `train_batches` is asked for augment=True.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    name: str
    default_augment: Augment | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example: (C, H, W) for images, (seq_len,) for text."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with all four tensors on `device`."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def train_loader(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Loader:
        """Shuffled (and optionally augmented) batches of the training split; see `Loader`."""
        return Loader(
            self.train_x,
            self.train_y,
            batch_size,
            shuffle=True,
            seed=seed,
            augment=augment,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )

    def test_loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Loader:
        """Batches of the test split in order, without augmentation."""
        return Loader(self.test_x, self.test_y, batch_size, rank=rank, world_size=world_size)

    def steps_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """Training batches per epoch (what `train_batches` yields)."""
        return len(self.train_loader(batch_size, drop_last=drop_last))

    def train_batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int = 0,
        augment: bool | Augment | None = False,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The training batches of one epoch; augment=True means `default_augment`."""
        if isinstance(augment, bool):
            augment = self.default_augment if augment else None
        loader = self.train_loader(batch_size, seed=seed, augment=augment, drop_last=drop_last)
        return loader.epoch(epoch)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Per-batch image augmentation on tensors: random crop after padding, horizontal flip.

    The crop pads with *reflection* (no black borders for the model to learn), then takes a
    random H×W window per image, i.e. a shift of up to `crop_padding` pixels each way.

    >>> Augment.for_shape((1, 28, 28))
    Augment(crop_padding=2, flip=True)
    """

    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"Augment.crop_padding must be >= 0, got {self.crop_padding}")

    @classmethod
    def for_shape(cls, input_shape: Sequence[int], *, flip: bool = True) -> Augment:
        """The usual recipe: pad 2 for MNIST-size (≤ 28 px) images, 4 for CIFAR-size ones.

        Pass flip=False for data that is not mirror-symmetric (digits).
        """
        if len(input_shape) != 3:
            raise ValueError(f"augmentation needs (C, H, W) images, got shape {input_shape}")
        return cls(crop_padding=2 if input_shape[1] <= 28 else 4, flip=flip)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch x (B, C, H, W); random draws come from `generator` (on the CPU)."""
        if x.dim() != 4:
            raise ValueError(f"augmentation needs (B, C, H, W) images, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            # Offsets are drawn on the CPU generator so CPU and GPU runs crop identically.
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
            rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            # Advanced indices on dims 0, 2, 3 around a slice put channels last: (B, H, W, C).
            x = padded[batch, :, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 1, 2).contiguous()
        if self.flip:
            mirror = (torch.rand(b, generator=generator) < 0.5).to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return x


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch), so resuming at epoch e replays exactly epoch e's batches.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


class Loader:
    """Batches (x, y) from tensors already on the device.

    Shuffling and augmentation draw from a CPU `torch.Generator` seeded by (seed, epoch), so
    the batches of an epoch are a pure function of the seed and the epoch number: a resumed run
    sees the same data as an uninterrupted one. With `world_size > 1` every rank takes a
    disjoint, equal-sized share (rank::world_size) of the same permutation.

    Args:
        x, y: examples and targets, first dimension N.
        batch_size: examples per batch (per rank).
        shuffle: permute the examples each epoch.
        seed: base seed of the per-epoch permutation and augmentation.
        augment: per-batch augmentation, or None.
        drop_last: drop the final short batch (and the examples that do not split evenly
            across ranks), so every batch is full and every rank runs the same count.
        rank, world_size: this process's place among data-parallel processes.

    >>> x, y = torch.arange(10.0), torch.arange(10)
    >>> loader = Loader(x, y, 4, shuffle=True, seed=1)
    >>> len(loader), [len(b) for b, _ in loader.epoch(3)]
    (3, [4, 4, 2])
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch (before dropping a short last batch)."""
        n = self.x.shape[0]
        if self.drop_last:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of epoch `epoch` (0-based); the same (seed, epoch) gives the same ones."""
        generator = _epoch_generator(self.seed, epoch)
        n = self.x.shape[0]
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.drop_last:
            order = order[: n - n % self.world_size]
        order = order[self.rank :: self.world_size].to(self.x.device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.x[index]
            if self.augment is not None:
                x = self.augment(x, generator)
            yield x, self.y[index]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Epoch 0's batches; training loops should call `epoch(e)` to reshuffle each epoch."""
        return self.epoch(0)


# ---------------------------------------------------------------------------------------------
# Locating and downloading files
# ---------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "qtrain"


def _search_roots(data_dir: str | Path | None) -> list[Path]:
    roots = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get(DATA_ENV_VAR):
        roots.append(Path(os.environ[DATA_ENV_VAR]))
    return [*roots, DEBIAN_DATASETS_DIR, _cache_dir()]


def dataset_search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched, in order, for dataset `name`'s files.

    Each root — `data_dir`, `$QTRAIN_DATA`, `/usr/share/datasets` (Debian's dataset packages),
    the download cache `~/.cache/qtrain` — is tried as is and with the dataset's subdirectory
    names appended (e.g. `<root>/fashion-mnist`, `<root>/cifar-10-batches-py`).
    """
    _check_name(name)
    if name not in _LOCAL_SOURCES:
        raise ValueError(f"data: dataset {name!r} is generated or given a directory, not searched")
    source = _LOCAL_SOURCES[name]
    dirs: list[Path] = []
    for root in _search_roots(data_dir):
        for sub in source.subdirs:
            candidate = root / sub
            if candidate not in dirs:
                dirs.append(candidate)
    return dirs


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise `ChecksumError` unless the file's SHA-256 hex digest equals `expected`."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ChecksumError(
            f"{path}: SHA-256 {digest.hexdigest()} does not match the published {expected}; "
            "the file is corrupt or not the original (delete it and download again)"
        )


def _download(urls: Sequence[str], dest: Path, sha256: str) -> Path:
    """Fetch the first mirror whose file matches `sha256` into `dest`; keep nothing else.

    Plain-http mirrors are acceptable: the published digest, not the transport, vouches for
    the file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as f:
                shutil.copyfileobj(response, f)
            verify_sha256(partial, sha256)
        except (OSError, ChecksumError) as e:
            failures.append(f"  {url}: {e}")
            partial.unlink(missing_ok=True)
            continue
        partial.replace(dest)
        return dest
    raise DownloadError(f"could not download {dest.name}:\n" + "\n".join(failures))


@dataclasses.dataclass(frozen=True)
class _LocalSource:
    """Where a file-backed dataset lives and how to tell a directory holds all of it."""

    subdirs: tuple[str, ...]  # tried under every search root; "" is the root itself
    is_complete: Callable[[Path], bool]
    files: str  # the files looked for, for the error message
    how_to_get: str


def _locate(request: _Request, fetch: Callable[[Path], Path]) -> Path:
    """The first complete directory on the search path; else download, or explain."""
    source = _LOCAL_SOURCES[request.name]
    if request.data_dir is not None and not request.download and not request.data_dir.is_dir():
        # A mistyped --data-dir must not fall through silently to another copy of the data.
        raise DatasetNotFoundError(
            f"data_dir {str(request.data_dir)!r} is not a directory; give the directory that "
            f"holds {source.files}, or leave data_dir out to search the default places"
        )
    searched = dataset_search_dirs(request.name, request.data_dir)
    for directory in searched:
        if source.is_complete(directory):
            return directory
    if request.download:
        return fetch(request.data_dir if request.data_dir is not None else _cache_dir())
    lines = "\n".join(f"  {d}" for d in searched)
    raise DatasetNotFoundError(
        f"dataset {request.name!r} not found. Looked for {source.files} in:\n{lines}\n"
        f"To get it: {source.how_to_get}; or put the files in --data-dir or ${DATA_ENV_VAR}."
    )


# ---------------------------------------------------------------------------------------------
# IDX files: MNIST, Fashion-MNIST
# ---------------------------------------------------------------------------------------------

# Third magic byte → element type; multi-byte types are big-endian (LeCun's format spec).
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {  # field of Dataset → file stem; files may be raw or have a .gz suffix
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":  # gzip magic; decided by content, not by the file name
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip data ({e})") from e


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed, as a native-endian array.

    Raises:
        DataFormatError: bad magic number, unknown element type, or a size that disagrees
            with the header (truncated or padded file).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: not an IDX file (magic number 0x{raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise DataFormatError(
            f"{path}: {len(raw)} bytes, but its header {dims} needs {expected} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_path(directory: Path, stem: str) -> Path | None:
    return next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)


def _has_idx_files(directory: Path) -> bool:
    return all(_idx_path(directory, stem) is not None for stem in _IDX_FILES.values())


def _read_idx_checked(path: Path, ndim: int) -> np.ndarray:
    array = read_idx(path)
    if array.dtype != np.uint8 or array.ndim != ndim:
        raise DataFormatError(
            f"{path}: expected uint8 with {ndim} dimension(s) (magic 0x0000080{ndim}), "
            f"got {array.dtype} with shape {array.shape}"
        )
    return array


@dataclasses.dataclass(frozen=True)
class _IdxDataset:
    mean: float
    std: float
    flip: bool  # mirror-image augmentation (clothes: yes; digits: no, a mirrored 2 is no 2)
    mirrors: tuple[str, ...]  # base URLs; file name appended
    sha256: dict[str, str]  # of the published .gz files


_FASHION_MNIST = _IdxDataset(
    mean=0.2860,
    std=0.3530,
    flip=True,
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    sha256={
        "train-images-idx3-ubyte.gz": (
            "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc"
        ),
        "train-labels-idx1-ubyte.gz": (
            "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf"
        ),
    },
)
_MNIST = _IdxDataset(
    mean=0.1307,
    std=0.3081,
    flip=False,
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    sha256={
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
        ),
    },
)


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, C, H, W) → float32 in units of the dataset's per-channel std."""
    x = torch.from_numpy(images).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _fetch_idx(spec: _IdxDataset, name: str, root: Path) -> Path:
    target = root / name
    for filename, sha256 in spec.sha256.items():
        dest = target / filename
        if not dest.is_file():
            _download([base + filename for base in spec.mirrors], dest, sha256)
    return target


def _load_idx(request: _Request, *, spec: _IdxDataset) -> Dataset:
    directory = _locate(request, functools.partial(_fetch_idx, spec, request.name))
    split = {}
    for prefix in ("train", "test"):
        images_path = _idx_path(directory, _IDX_FILES[f"{prefix}_x"])
        labels_path = _idx_path(directory, _IDX_FILES[f"{prefix}_y"])
        assert images_path is not None and labels_path is not None  # _locate checked
        images = _read_idx_checked(images_path, ndim=3)
        labels = _read_idx_checked(labels_path, ndim=1)
        if len(images) != len(labels):
            raise DataFormatError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        split[f"{prefix}_x"] = _normalise(images[:, None], (spec.mean,), (spec.std,))
        split[f"{prefix}_y"] = torch.from_numpy(labels.astype(np.int64))
    augment = Augment.for_shape(tuple(split["train_x"].shape[1:]), flip=spec.flip)
    return Dataset(**split, num_classes=10, name=request.name, default_augment=augment)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python pickle batches
# ---------------------------------------------------------------------------------------------

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

# The only globals a CIFAR batch may name: plain containers and numpy's array reconstruction
# (module paths of numpy 1 and 2; `_frombuffer` is what pickle protocol 5 uses).
_PICKLE_ALLOWED: dict[tuple[str, str], object] = {
    **{
        (module, kind.__name__): kind
        for module in ("builtins", "__builtin__")
        for kind in (dict, list, bytes, str, int)
    },
    **{
        (f"numpy.{core}.multiarray", "_reconstruct"): _np_multiarray._reconstruct
        for core in ("core", "_core")
    },
    **{
        (f"numpy.{core}.numeric", "_frombuffer"): _np_numeric._frombuffer
        for core in ("core", "_core")
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only an allow-list of globals, so loading runs no code.

    A pickle can call any importable callable (e.g. `os.system`) while loading; every such
    reference goes through `find_class`, which here refuses all but dict/list/bytes/str/int and
    numpy array reconstruction.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only plain containers and numpy "
                "arrays are allowed in a data file"
            ) from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    with path.open("rb") as f:
        try:
            # encoding="bytes": the batches were pickled by Python 2, whose str is bytes.
            batch = RestrictedUnpickler(f, encoding="bytes").load()
        except EOFError as e:
            raise DataFormatError(f"{path}: truncated pickle") from e
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(batch).__name__}")
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = fields.get("data"), fields.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise DataFormatError(f"{path}: 'data' is not a uint8 (N, 3072) array")
    if data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise DataFormatError(f"{path}: 'labels' is not a list of ints")
    if len(labels) != len(data):
        raise DataFormatError(f"{path}: {len(data)} images but {len(labels)} labels")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _has_cifar_files(directory: Path) -> bool:
    return all((directory / f).is_file() for f in (*_CIFAR_TRAIN_FILES, *_CIFAR_TEST_FILES))


def _fetch_cifar10(root: Path) -> Path:
    target = root / "cifar10"
    archive = _download([_CIFAR_URL], target / "cifar-10-python.tar.gz", _CIFAR_SHA256)
    batches = target / _CIFAR_DIR
    batches.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        # Copy the known members by name instead of extractall: member paths are not trusted.
        for name in (*_CIFAR_TRAIN_FILES, *_CIFAR_TEST_FILES):
            try:
                member = tar.extractfile(f"{_CIFAR_DIR}/{name}")
            except KeyError:
                member = None
            if member is None:
                raise DataFormatError(f"{archive}: no regular file {_CIFAR_DIR}/{name}")
            (batches / name).write_bytes(member.read())
    return batches


def _load_cifar10(request: _Request) -> Dataset:
    directory = _locate(request, _fetch_cifar10)
    split = {}
    for prefix, files in (("train", _CIFAR_TRAIN_FILES), ("test", _CIFAR_TEST_FILES)):
        images, labels = zip(*(_read_cifar_batch(directory / f) for f in files), strict=True)
        split[f"{prefix}_x"] = _normalise(np.concatenate(images), _CIFAR_MEAN, _CIFAR_STD)
        split[f"{prefix}_y"] = torch.from_numpy(np.concatenate(labels))
    augment = Augment.for_shape((3, 32, 32))
    return Dataset(**split, num_classes=10, name=request.name, default_augment=augment)


# ---------------------------------------------------------------------------------------------
# Synthetic images and byte-level text
# ---------------------------------------------------------------------------------------------


def _load_synthetic(
    request: _Request,
    *,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    size: int = 5000,
    test_size: int = 1000,
    noise: float = 1.0,
) -> Dataset:
    """Class-dependent mean pattern plus Gaussian noise, all drawn from the seed.

    For (…, H, W) shapes the class patterns are constant over 4×4 pixel blocks, so they are
    visible to small convolutions and survive pooling; a small CNN learns them in one epoch.
    No default augmentation: a shifted or mirrored pattern is no longer its class's pattern.
    """
    sizes = isinstance(shape, Sequence) and not isinstance(shape, str) and len(shape) > 0
    if not (sizes and all(matches(n, int) and n >= 1 for n in shape)):
        refuse("synthetic: shape", shape, "a non-empty list of ints >= 1", ValueError)
    shape = tuple(shape)
    if num_classes < 2 or size < 1 or test_size < 1:
        raise ValueError(
            f"synthetic needs num_classes >= 2 and size/test_size >= 1; got {num_classes}, "
            f"{size}/{test_size}"
        )
    generator = torch.Generator().manual_seed(request.seed)
    if len(shape) >= 2:
        *lead, h, w = shape
        coarse = torch.randn(num_classes, *lead, -(-h // 4), -(-w // 4), generator=generator)
        means = coarse.repeat_interleave(4, -2).repeat_interleave(4, -1)[..., :h, :w]
    else:
        means = torch.randn(num_classes, *shape, generator=generator)
    scale = 1 / math.sqrt(1 + noise**2)  # keeps the inputs at unit variance

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(num_classes, (n,), generator=generator)
        x = (means[y] + noise * torch.randn(n, *shape, generator=generator)) * scale
        return x, y

    (train_x, train_y), (test_x, test_y) = draw(size), draw(test_size)
    return Dataset(train_x, train_y, test_x, test_y, num_classes=num_classes, name=request.name)


# Not part of "the Python standard library's own sources", and different on every machine.
_TEXT_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _text_files(directory: Path, pattern: str) -> Iterator[Path]:
    # Lazily, depth first, in sorted order: the order is deterministic and a byte cap over a
    # big tree stops the walk early.
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in _TEXT_SKIP_DIRS and not entry.name.startswith("."):
                yield from _text_files(Path(entry.path), pattern)
        elif entry.is_file() and fnmatch.fnmatch(entry.name, pattern):
            yield Path(entry.path)


def _read_corpus(directory: Path, pattern: str, max_bytes: int) -> bytes:
    chunks, total = [], 0
    for path in _text_files(directory, pattern):
        chunk = path.read_bytes()[: max_bytes - total]
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(chunks)


def _next_byte_windows(tokens: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows x (N, seq_len) and their one-byte-shifted targets y."""
    n = (len(tokens) - 1) // seq_len
    tokens = tokens.long()
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


def _load_text(
    request: _Request,
    *,
    seq_len: int = 128,
    max_bytes: int = 4_000_000,
    pattern: str = "*.py",
) -> Dataset:
    """Byte-level language-model data from the files matching `pattern` under `data_dir`.

    Default directory: the Python standard library's sources. Files are read in sorted path
    order and concatenated up to `max_bytes`; the last 10% of the bytes are the test split.
    """
    directory = request.data_dir or Path(sysconfig.get_paths()["stdlib"])
    if not Path(directory).is_dir():
        raise DatasetNotFoundError(f"text corpus directory {directory} does not exist")
    corpus = _read_corpus(Path(directory), pattern, max_bytes)
    num_test_bytes = int(len(corpus) * TEXT_TEST_FRACTION)
    if seq_len < 1 or num_test_bytes < seq_len + 1:
        raise ValueError(
            f"text corpus too small: {len(corpus)} bytes of {pattern!r} under {directory} give "
            f"no test window of seq_len={seq_len} (need {10 * (seq_len + 1)}+ bytes)"
        )
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    split = len(tokens) - num_test_bytes
    train_x, train_y = _next_byte_windows(tokens[:split], seq_len)
    test_x, test_y = _next_byte_windows(tokens[split:], seq_len)
    return Dataset(train_x, train_y, test_x, test_y, num_classes=256, name=request.name)


# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Request:
    name: str
    data_dir: Path | None
    seed: int
    download: bool


DATASETS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": functools.partial(_load_idx, spec=_FASHION_MNIST),
    "mnist": functools.partial(_load_idx, spec=_MNIST),
    "cifar10": _load_cifar10,
    "synthetic": _load_synthetic,
    "text": _load_text,
}
"""Dataset name → loader(request, **kw). Extra keyword arguments of `load_dataset` go to it."""

_IDX_FILES_TEXT = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
_DOWNLOAD_HINT = "pass download=True (CLI: --download)"
_LOCAL_SOURCES = {
    "fashion-mnist": _LocalSource(
        ("", "fashion-mnist"),
        _has_idx_files,
        _IDX_FILES_TEXT,
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs into "
        f"/usr/share/datasets/fashion-mnist), or {_DOWNLOAD_HINT}",
    ),
    "mnist": _LocalSource(("", "mnist"), _has_idx_files, _IDX_FILES_TEXT, _DOWNLOAD_HINT),
    "cifar10": _LocalSource(
        ("", _CIFAR_DIR, "cifar10", f"cifar10/{_CIFAR_DIR}"),
        _has_cifar_files,
        ", ".join((*_CIFAR_TRAIN_FILES, *_CIFAR_TEST_FILES)),
        f"{_DOWNLOAD_HINT}, or unpack {_CIFAR_URL} there",
    ),
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"data: unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _take_subset(
    x: Tensor, y: Tensor, n: int | None, seed: int, split: str
) -> tuple[Tensor, Tensor]:
    """The first n examples of a permutation drawn from `seed`; all of them when n is None."""
    if n is None:
        return x, y
    if not 1 <= n <= len(x):
        raise ValueError(f"{split}_subset must be in 1..{len(x)}, got {n}")
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[index], y[index]


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = False,
    **kw: object,
) -> Dataset:
    """Load a dataset by name onto `device`.

    Args:
        name: one of `DATASETS`: fashion-mnist, mnist, cifar10, synthetic, text.
        data_dir: first directory to search for the files (see `dataset_search_dirs`), the
            download target, or for `text` the corpus directory (default: Python's stdlib).
        train_subset, test_subset: keep only this many examples, chosen by a permutation
            drawn from `seed` (the same seed keeps the same examples).
        seed: seed of the subsets, and of the data itself for `synthetic`.
        device: where the tensors go.
        download: fetch missing IDX/CIFAR files from the public mirrors (SHA-256 verified)
            into `data_dir/<name>`, or `~/.cache/qtrain/<name>` without a data_dir.
        **kw: dataset options — synthetic: shape, num_classes, size, test_size, noise;
            text: seq_len, max_bytes, pattern.

    Raises:
        ValueError: unknown name.
        DatasetNotFoundError: files not found (the message lists where it looked).
        DataFormatError: a file is corrupt or truncated.

    >>> load_dataset("text", seq_len=64, max_bytes=200_000).train_x.shape[1]
    64
    """
    _check_name(name)
    request = _Request(name, Path(data_dir) if data_dir is not None else None, seed, download)
    ds = DATASETS[name](request, **kw)
    train_x, train_y = _take_subset(ds.train_x, ds.train_y, train_subset, seed, "train")
    test_x, test_y = _take_subset(ds.test_x, ds.test_y, test_subset, seed, "test")
    subset = dataclasses.replace(ds, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return subset.to(device)
