"""Tests for qtrain.data: file formats, lookup, subsets, batching and augmentation."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain import data
from qtrain.data import (
    Augment,
    ChecksumError,
    DataFormatError,
    DatasetNotFoundError,
    DownloadError,
    Loader,
    RestrictedUnpickler,
    load_dataset,
    read_idx,
    verify_sha256,
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep this machine's $QTRAIN_DATA, Debian datasets and download cache out of the tests."""
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "DEBIAN_DATASETS_DIR", tmp_path / "debian")


# ---- IDX -------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return header + big_endian.tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_idx_dir(directory: Path, *, gz: bool, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 6, 6), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 6, 6), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for field, array in arrays.items():
        write_file(directory / IDX_STEMS[field], idx_bytes(array), gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("array", "type_code"),
    [
        (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-300, 2, 7], dtype=np.int16), 0x0B),
        (np.array([[1.5, -2.25]], dtype=np.float32), 0x0D),
    ],
)
def test_read_idx_round_trip(tmp_path: Path, gz: bool, array: np.ndarray, type_code: int) -> None:
    path = write_file(tmp_path / "x-idx", idx_bytes(array, type_code), gz)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["data_dir", "env_dir", "env_subdir"])
def test_idx_dataset_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool, layout: str
) -> None:
    root = tmp_path / "root"
    arrays = make_idx_dir(root / "mnist" if layout == "env_subdir" else root, gz=gz)
    if layout == "data_dir":
        ds = load_dataset("mnist", data_dir=root)
    else:
        monkeypatch.setenv(data.DATA_ENV_VAR, str(root))
        ds = load_dataset("mnist")
    assert ds.input_shape == (1, 6, 6) and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (12, 5)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    expected = (torch.from_numpy(arrays["train_x"]).float()[:, None] / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(ds.train_x, expected)
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["test_y"])


def test_idx_bad_magic_is_refused(tmp_path: Path) -> None:
    path = write_file(tmp_path / "bad", b"\xde\xad\xbe\xef" + bytes(16), gz=False)
    with pytest.raises(DataFormatError, match="not an IDX file"):
        read_idx(path)


def test_idx_labels_file_in_place_of_images_is_refused(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    labels = (tmp_path / IDX_STEMS["train_y"]).read_bytes()
    (tmp_path / IDX_STEMS["train_x"]).write_bytes(labels)  # magic 0x801 where 0x803 belongs
    with pytest.raises(DataFormatError, match="magic 0x00000803"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_file_is_refused(tmp_path: Path, gz: bool) -> None:
    payload = idx_bytes(np.zeros((4, 6, 6), dtype=np.uint8))[:-7]
    path = write_file(tmp_path / "short", payload, gz)
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(path)


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 6, 6), dtype=np.uint8)))[:30])
    with pytest.raises(DataFormatError, match="gzip"):
        read_idx(path)


def test_image_label_count_mismatch_is_refused(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    write_file(tmp_path / IDX_STEMS["test_y"], idx_bytes(np.zeros(4, dtype=np.uint8)), gz=False)
    with pytest.raises(DataFormatError, match="5 images but .* 4 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_dataset_message_lists_every_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "given").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "given")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for directory in (
        tmp_path / "given",
        tmp_path / "given" / "fashion-mnist",
        tmp_path / "env",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "debian" / "fashion-mnist",
        tmp_path / "xdg-cache" / "qtrain" / "fashion-mnist",
    ):
        assert f"  {directory}\n" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--download" in message
    assert data.dataset_search_dirs("fashion-mnist", tmp_path / "given")[0] == tmp_path / "given"


def test_mistyped_data_dir_is_refused_not_searched_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data exist elsewhere on the search path; a data_dir that is not a directory must
    # still be an error rather than a silent fall-through to that other copy.
    make_idx_dir(tmp_path / "env" / "fashion-mnist", gz=True)
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    assert load_dataset("fashion-mnist").train_x.shape[0] > 0
    with pytest.raises(DatasetNotFoundError, match="data_dir '.*typo' is not a directory"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "typo")


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="data: unknown dataset 'imagenet'.*fashion-mnist.*text"):
        load_dataset("imagenet")


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist", data_dir=DEBIAN_FASHION_MNIST)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    assert set(ds.train_y.unique().tolist()) == set(range(10))
    # The fixed normalisation constants are the training set's own statistics.
    assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-3
    assert ds.default_augment == Augment(crop_padding=2, flip=True)


# ---- checksums and downloads ----------------------------------------------------------------


def test_verify_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"qtrain")
    verify_sha256(path, hashlib.sha256(b"qtrain").hexdigest())
    with pytest.raises(ChecksumError, match="does not match"):
        verify_sha256(path, "0" * 64)


def test_published_checksums_are_sha256_hex() -> None:
    digests = [*data._FASHION_MNIST.sha256.values(), *data._MNIST.sha256.values()]
    digests.append(data._CIFAR_SHA256)
    assert len(set(digests)) == 9
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in digests)


def test_download_from_mirror_verifies_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download=True end to end, with a file:// mirror standing in for the public one."""
    mirror = tmp_path / "mirror"
    arrays = make_idx_dir(mirror, gz=True)
    digests = {
        f"{stem}.gz": hashlib.sha256((mirror / f"{stem}.gz").read_bytes()).hexdigest()
        for stem in IDX_STEMS.values()
    }
    spec = data._IdxDataset(
        0.5, 0.5, False, ("file:///nonexistent/", mirror.as_uri() + "/"), digests
    )
    monkeypatch.setitem(data.DATASETS, "mnist", functools.partial(data._load_idx, spec=spec))
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", data_dir=tmp_path / "dl")
    ds = load_dataset("mnist", data_dir=tmp_path / "dl", download=True)
    assert sorted(os.listdir(tmp_path / "dl" / "mnist")) == sorted(digests)
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train_y"])

    bad = data._IdxDataset(
        0.5, 0.5, False, (mirror.as_uri() + "/",), dict.fromkeys(digests, "0" * 64)
    )
    monkeypatch.setitem(data.DATASETS, "mnist", functools.partial(data._load_idx, spec=bad))
    with pytest.raises(DownloadError, match="does not match"):
        load_dataset("mnist", data_dir=tmp_path / "dl2", download=True)
    assert not any((tmp_path / "dl2" / "mnist").iterdir())  # nothing unverified is kept


# ---- CIFAR-10 ---------------------------------------------------------------------------------


def cifar_batch(n: int, first_label: int) -> dict:
    planes = np.zeros((n, 3, 1024), dtype=np.uint8)
    planes[:, 1] = 255  # green plane only: checks the channel-major row layout
    labels = [(first_label + i) % 10 for i in range(n)]
    return {b"batch_label": b"fake", b"labels": labels, b"data": planes.reshape(n, 3072)}


def make_cifar_dir(directory: Path, protocol: int, n: int = 3) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*(f"data_batch_{j}" for j in range(1, 6)), "test_batch"]):
        (directory / name).write_bytes(pickle.dumps(cifar_batch(n, i), protocol=protocol))


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar10_fake_batches(tmp_path: Path, protocol: int) -> None:
    make_cifar_dir(tmp_path / "cifar-10-batches-py", protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64 and ds.train_y[:4].tolist() == [0, 1, 2, 1]
    torch.testing.assert_close(
        ds.train_x[0, :, 5, 7],
        torch.tensor([-0.4914, 1 - 0.4822, -0.4465]) / torch.tensor([0.2470, 0.2435, 0.2616]),
    )
    assert ds.default_augment == Augment(crop_padding=4, flip=True)


class RunsShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": RunsShellCommand(f"touch {marker}"), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    make_cifar_dir(tmp_path / "cifar", protocol=4, n=1)
    (tmp_path / "cifar" / "test_batch").write_bytes(payload)
    with pytest.raises(
        pickle.UnpicklingError, match=r"refusing to load global (os|posix|nt)\.system"
    ):
        load_dataset("cifar10", data_dir=tmp_path / "cifar")
    assert not marker.exists()


def test_cifar_batch_with_wrong_contents_is_refused(tmp_path: Path) -> None:
    make_cifar_dir(tmp_path, protocol=4, n=2)
    batch = cifar_batch(2, 0) | {b"labels": [1]}
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DataFormatError, match="2 images but 1 labels"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_download_extracts_only_known_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_cifar_dir(tmp_path / "src" / "cifar-10-batches-py", protocol=4, n=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        evil = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        tar.addfile(evil, io.BytesIO(b""))
    monkeypatch.setattr(data, "_CIFAR_URL", archive.as_uri())
    monkeypatch.setattr(data, "_CIFAR_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    ds = load_dataset("cifar10", download=True)  # into the (isolated) cache
    assert ds.num_train == 10
    assert not list(tmp_path.rglob("escaped"))
    assert load_dataset("cifar10").num_test == 2  # found in the cache without downloading


# ---- synthetic, text, subsets ------------------------------------------------------------------


def test_synthetic_is_seeded() -> None:
    kw = dict(shape=(2, 6, 6), num_classes=3, size=20, test_size=4)
    a, b = load_dataset("synthetic", seed=1, **kw), load_dataset("synthetic", seed=1, **kw)
    c = load_dataset("synthetic", seed=2, **kw)
    assert a.input_shape == (2, 6, 6) and a.num_classes == 3 and a.test_x.shape[0] == 4
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    assert a.default_augment is None


def test_subsets_are_deterministic() -> None:
    full = load_dataset("synthetic", shape=(4,), size=50, test_size=30)
    kw = dict(shape=(4,), size=50, test_size=30, train_subset=10, test_subset=7)
    a = load_dataset("synthetic", **kw)
    b = load_dataset("synthetic", **kw)
    assert (a.num_train, a.num_test) == (10, 7)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    # Each kept example is one of the full set's, with its own label.
    match = (a.train_x[:, None] == full.train_x[None]).all(-1).int().argmax(1)
    assert torch.equal(full.train_x[match], a.train_x) and torch.equal(
        full.train_y[match], a.train_y
    )
    assert len(set(match.tolist())) == 10
    other = load_dataset("synthetic", shape=(4,), size=50, test_size=30, train_subset=10)
    with pytest.raises(ValueError, match="train_subset must be in 1..50"):
        load_dataset("synthetic", shape=(4,), size=50, train_subset=51)
    assert other.num_test == 30


def test_text_corpus(tmp_path: Path) -> None:
    (tmp_path / "b.py").write_bytes(bytes(range(100, 200)))
    (tmp_path / "a.py").write_bytes(bytes(range(100)))
    (tmp_path / "notes.txt").write_bytes(b"x" * 500)  # not matched by *.py
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_bytes(bytes(range(200, 256)) * 2)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "d.py").write_bytes(b"\0" * 500)
    ds = load_dataset("text", data_dir=tmp_path, seq_len=8, max_bytes=300)
    corpus = bytes(range(256)) + bytes(range(200, 244))  # a, b, sub/c in order, capped at 300
    assert ds.num_classes == 256 and ds.input_shape == (8,)
    assert ds.train_x.dtype == torch.int64
    # Train: the first 270 bytes as 33 windows; test: the last 30 bytes as 3 windows.
    assert ds.train_x.shape == (33, 8) and ds.test_x.shape == (3, 8)
    assert ds.train_x.flatten().tolist() == list(corpus[:264])
    assert ds.train_y.flatten().tolist() == list(corpus[1:265])
    assert ds.test_x.flatten().tolist() == list(corpus[270:294])
    assert torch.equal(ds.test_y[:, :-1], ds.test_x[:, 1:])


def test_text_defaults_to_python_stdlib() -> None:
    ds = load_dataset("text", seq_len=32, max_bytes=20_000, device="cpu")
    assert ds.train_x.shape == (562, 32) and ds.test_x.shape == (62, 32)
    assert b"import" in bytes(ds.train_x.flatten().tolist())


def test_text_too_small(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_bytes(b"pass\n")
    with pytest.raises(ValueError, match="too small"):
        load_dataset("text", data_dir=tmp_path, seq_len=8)


# ---- loader and augmentation ----------------------------------------------------------------


def batches_of(loader: Loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def test_loader_is_deterministic_per_seed_and_epoch() -> None:
    x, y = torch.arange(50.0)[:, None], torch.arange(50)
    loader = Loader(x, y, 8, shuffle=True, seed=3)
    first, again = batches_of(loader, 2), batches_of(Loader(x, y, 8, shuffle=True, seed=3), 2)
    assert len(loader) == len(first) == 7
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(
        torch.cat([b for _, b in first]), torch.cat([b for _, b in batches_of(loader, 3)])
    )
    assert sorted(torch.cat([b for _, b in first]).tolist()) == list(range(50))  # a permutation
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in first)  # x and y stay paired
    other_seed = batches_of(Loader(x, y, 8, shuffle=True, seed=4), 2)
    assert not torch.equal(first[0][1], other_seed[0][1])


def test_loader_in_order_and_drop_last() -> None:
    x, y = torch.zeros(10, 1), torch.arange(10)
    assert [b.tolist() for _, b in Loader(x, y, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = Loader(x, y, 4, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and [len(b) for _, b in dropped.epoch(1)] == [4, 4]


def test_loader_shards_across_ranks() -> None:
    x, y = torch.zeros(11, 1), torch.arange(11)
    shards = [
        Loader(x, y, 2, shuffle=True, seed=0, drop_last=True, rank=r, world_size=3)
        for r in range(3)
    ]
    seen = [torch.cat([b for _, b in shard.epoch(5)]) for shard in shards]
    assert [len(s) for s in shards] == [1, 1, 1]
    assert len(set(torch.cat(seen).tolist())) == 6  # disjoint
    assert {len(s) for s in seen} == {2}


def reference_crop(
    x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor
) -> torch.Tensor:
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    h, w = x.shape[-2:]
    return torch.stack(
        [padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))]
    )


def test_random_crop_matches_reference() -> None:
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = Augment(crop_padding=2)(x, torch.Generator().manual_seed(7))
    offsets = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 5, (16,), generator=offsets)
    dx = torch.randint(0, 5, (16,), generator=offsets)
    torch.testing.assert_close(out, reference_crop(x, 2, dy, dx), rtol=0, atol=0)
    assert not torch.equal(out, x)


def test_flip_mirrors_some_images() -> None:
    x = torch.randn(32, 1, 5, 5)
    out = Augment(flip=True)(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < 32


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_augmented_batches_keep_shape_and_are_deterministic(shape: tuple[int, ...]) -> None:
    ds = load_dataset("synthetic", shape=shape, size=40, test_size=4)
    augment = Augment.for_shape(shape)
    assert augment.crop_padding == {28: 2, 32: 4}[shape[1]]
    run = [list(ds.train_batches(16, epoch=1, augment=augment)) for _ in range(2)]
    plain = list(ds.train_batches(16, epoch=1))
    assert [tuple(x.shape) for x, _ in run[0]] == [(16, *shape), (16, *shape), (8, *shape)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*run, strict=True))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(run[0], plain, strict=True))  # same order
    assert not torch.equal(run[0][0][0], plain[0][0])
    assert ds.steps_per_epoch(16) == 3 and ds.steps_per_epoch(16, drop_last=True) == 2


def test_augment_true_on_text_is_a_no_op(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_bytes(bytes(range(256)) * 4)
    ds = load_dataset("text", data_dir=tmp_path, seq_len=16)
    (x, _), *_ = ds.train_batches(4, epoch=0, seed=1, augment=True)
    assert x.shape == (4, 16) and x.dtype == torch.int64


def test_dataset_to_device_and_test_loader() -> None:
    ds = load_dataset("synthetic", shape=(1, 4, 4), size=8, test_size=6, device="cpu")
    assert ds.device == torch.device("cpu") and ds.to("cpu").num_test == 6
    assert [len(y) for _, y in ds.test_loader(4)] == [4, 2]
