"""The user's own data for ``lambda-gelu hf``: text or image examples from a file or folder, a held-out part, batches.

:func:`load_examples` reads

* **text** from a ``.txt`` file (one example per non-empty line, stripped), a ``.jsonl`` file (one JSON object a
  line), a ``.csv`` / ``.tsv`` file (a header row, then one example a row) or a folder written by the ``datasets``
  package (``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``; the ``train`` split where there is one). In
  the last three the text field is ``text_field`` when given, else the first of ``text``, ``sentence``,
  ``content`` that holds strings, else the only field that holds strings. Texts are stripped, and empty ones are
  skipped, in every format;
* **images** from a folder of ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.webp`` / ``.gif`` files, searched
  recursively (hidden files and folders skipped) and sorted by their path inside the folder. When every image
  lies inside a sub-folder, the top-level sub-folder's name is the image's label (as torchvision's
  ``ImageFolder`` does); when every image lies directly in the folder there are no labels. Each image is
  checked with PIL when the folder is read (``Image.verify``: the header and structure, not the pixels) and
  decoded, converted to RGB, only when it is used (:func:`open_image`, :func:`image_batches`).

:func:`split_held_out` shuffles with a seed and holds out a fraction; :func:`text_batches` and
:func:`image_batches` turn examples into model inputs with the model's own tokenizer or image processor.

Every problem with the data raises :class:`DataError`, with one line that starts with the path concerned and
says what is wrong with it. ``datasets`` (for its folders) and PIL (for images) are imported only when needed.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lambda_gelu.data import DataError as _CoreDataError

__all__ = [
    "IMAGE_SUFFIXES",
    "KINDS",
    "TEXT_FIELDS",
    "TEXT_SUFFIXES",
    "Batch",
    "DataError",
    "Examples",
    "image_batches",
    "load_examples",
    "open_image",
    "split_held_out",
    "text_batches",
]

KINDS = ("text", "image")
"""The kinds of example :func:`load_examples` reads."""

TEXT_FIELDS = ("text", "sentence", "content")
"""The field names tried, in order, for the text of a record (before "the only field that holds strings")."""

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
"""The text file formats, by file name suffix (case-insensitive)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
"""The image files looked for in an image folder, by file name suffix (case-insensitive)."""

Batch = dict[str, torch.Tensor]
"""One batch of model inputs: what a tokenizer or image processor returns, as a plain dict."""

_DATASETS_MARKERS = ("dataset_dict.json", "state.json")  # DatasetDict / Dataset .save_to_disk
_SUPPORTED = "a .txt, .jsonl, .csv or .tsv file, a folder saved by datasets, or a folder of images"


class DataError(_CoreDataError):
    """The user's data cannot be read: a missing path, an unknown format, a malformed file, an unreadable image.

    A :class:`ValueError` (through :class:`lambda_gelu.data.DataError`); its message is one line,
    ``"<path>: <what is wrong>"``.
    """


def _fail(path: Path | str, problem: str) -> DataError:
    """A :class:`DataError` with the one-line message ``"<path>: <problem>"``."""
    return DataError(" ".join(f"{path}: {problem}".split("\n")).replace("\r", " "))


@dataclass(frozen=True)
class Examples:
    """Examples read by :func:`load_examples`.

    ``items`` holds the texts (``kind == "text"``) or the image files' paths (``kind == "image"``), in the
    order read; ``labels`` one class name per item, or None (text always; images not in class sub-folders);
    ``source`` the file or folder they came from; ``field`` the record field the texts came from (None for a
    ``.txt`` file and for images).
    """

    kind: str
    items: list[Any]
    labels: list[str] | None
    source: Path
    field: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.labels is not None and len(self.labels) != len(self.items):
            raise ValueError(f"{len(self.labels)} labels for {len(self.items)} examples")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[str]:
        """The texts (text examples only)."""
        if self.kind != "text":
            raise TypeError(f"{self.source} holds {self.kind} examples, not text")
        return self.items

    @property
    def paths(self) -> list[Path]:
        """The image files (image examples only)."""
        if self.kind != "image":
            raise TypeError(f"{self.source} holds {self.kind} examples, not images")
        return self.items

    @property
    def classes(self) -> list[str]:
        """The distinct labels, sorted (empty without labels)."""
        return sorted(set(self.labels)) if self.labels is not None else []

    def subset(self, indices: Iterable[int]) -> Examples:
        """The examples at ``indices`` (in that order), with their labels."""
        indices = list(indices)
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return Examples(self.kind, [self.items[i] for i in indices], labels, self.source, self.field)


# ----------------------------------------------------------------------------- reading


def load_examples(path: str | Path, *, kind: str | None = None, text_field: str | None = None) -> Examples:
    """Read the examples in the file or folder ``path`` (see the module's docstring for the formats).

    ``kind`` is ``"text"``, ``"image"`` or None (decided by the path: a folder of images is image data, any
    other supported file or folder text). ``text_field`` names the field holding the text in ``.jsonl``,
    ``.csv`` / ``.tsv`` and datasets data (default: detected). Raises :class:`DataError` on any problem.
    """
    path = Path(path).expanduser()
    if kind is not None and kind not in KINDS:
        raise _fail(path, f"kind must be one of {', '.join(KINDS)} (or None to detect it), got {kind!r}")
    if not path.exists():
        raise _fail(path, "no such file or folder")
    if path.is_dir():
        return _load_folder(path, kind, text_field)
    if not path.is_file():
        raise _fail(path, f"not a regular file or folder; expected {_SUPPORTED}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise _fail(path, "a single image file; give the folder that holds the images")
    if suffix not in TEXT_SUFFIXES:
        what = f"unsupported file type {path.suffix!r}" if path.suffix else "a file without an extension"
        raise _fail(path, f"{what}; expected {_SUPPORTED}")
    if kind == "image":
        raise _fail(path, f"kind 'image' needs a folder of images, but this is a {suffix} (text) file")
    if text_field is not None and suffix == ".txt":
        raise _fail(path, f"text_field {text_field!r} given, but a .txt file has no fields (one text a line)")
    text = _read_text(path)
    if not text.strip():
        raise _fail(path, "the file is empty")
    if suffix == ".txt":
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        return Examples("text", texts, None, path)
    if suffix == ".jsonl":
        return _from_jsonl(path, text, text_field)
    return _from_csv(path, text, text_field, delimiter="\t" if suffix == ".tsv" else ",")


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark dropped)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _fail(path, f"cannot read the file ({error.strerror or type(error).__name__})") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise _fail(path, f"line {line} (byte {error.start}) is not UTF-8 text: {data[error.start:error.end]!r}") \
            from error


def _kind_of_json(value: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _pick_field(path: Path, fields: Sequence[str], string_fields: Sequence[str], text_field: str | None) -> str:
    """The field holding the text: ``text_field``, else the first of :data:`TEXT_FIELDS`, else the only string."""
    seen = ", ".join(map(repr, fields)) or "none"
    if text_field is not None:
        if text_field not in fields:
            raise _fail(path, f"no field {text_field!r} (fields seen: {seen})")
        return text_field
    for name in TEXT_FIELDS:
        if name in string_fields:
            return name
    if len(string_fields) == 1:
        return string_fields[0]
    if not string_fields:
        raise _fail(path, f"no usable text field: no field holds strings (fields seen: {seen})")
    raise _fail(path, f"no usable text field: none is named {'/'.join(TEXT_FIELDS)} and several hold strings "
                      f"(fields seen: {seen}); choose one with text_field")


def _clean(path: Path, texts: list[str], field: str) -> list[str]:
    """``texts`` stripped, the empty ones dropped; an error when none is left."""
    kept = [t.strip() for t in texts if t.strip()]
    if not kept:
        raise _fail(path, f"field {field!r} holds no non-empty text")
    return kept


def _from_jsonl(path: Path, text: str, text_field: str | None) -> Examples:
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _fail(path, f"line {number} is not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise _fail(path, f"line {number} is {_kind_of_json(record)}, not a JSON object")
        records.append((number, record))
    first = records[0][1]
    fields = list(dict.fromkeys(key for _, record in records for key in record))
    field = _pick_field(path, fields, [k for k, v in first.items() if isinstance(v, str)], text_field)
    texts = []
    for number, record in records:
        if field not in record:
            raise _fail(path, f"line {number} has no field {field!r}")
        value = record[field]
        if not isinstance(value, str):
            raise _fail(path, f"line {number}: field {field!r} is {_kind_of_json(value)}, not a string")
        texts.append(value)
    return Examples("text", _clean(path, texts, field), None, path, field)


def _from_csv(path: Path, text: str, text_field: str | None, delimiter: str) -> Examples:
    # .tsv: no quoting at all (tab-separated files routinely hold bare quote characters); .csv: standard quoting,
    # strictly (an unclosed quote or text after a closing quote is an error, not a silently merged field).
    tsv = delimiter == "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=not tsv)
    kind = "tab" if delimiter == "\t" else "comma"
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if header is None:
                if any(cell.strip() for cell in row):
                    header = [cell.strip() for cell in row]
            elif row:
                rows.append((reader.line_num, row))
    except csv.Error as error:
        raise _fail(path, f"line {reader.line_num} is not valid {kind}-separated text ({error})") from None
    if header is None:
        raise _fail(path, "no header row (every line is blank)")
    if not rows:
        raise _fail(path, "has a header row but no rows")
    field = _pick_field(path, header, header, text_field)
    column = header.index(field)
    texts = []
    for number, row in rows:
        if len(row) != len(header):
            raise _fail(path, f"line {number} has {len(row)} fields, the header has {len(header)}")
        texts.append(row[column])
    return Examples("text", _clean(path, texts, field), None, path, field)


def _is_datasets_folder(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _DATASETS_MARKERS)


def _load_folder(path: Path, kind: str | None, text_field: str | None) -> Examples:
    try:
        entries = sorted(os.listdir(path))
    except OSError as error:
        raise _fail(path, f"cannot read the folder ({error.strerror or type(error).__name__})") from None
    if _is_datasets_folder(path):
        if kind == "image":
            raise _fail(path, "a datasets folder, read as text; kind 'image' needs a folder of image files")
        return _from_datasets(path, text_field)
    images = _image_files(path)
    if images:
        if kind == "text":
            raise _fail(path, f"kind 'text', but this is a folder of {len(images)} images")
        if text_field is not None:
            raise _fail(path, f"text_field {text_field!r} given, but this is a folder of images")
        return _from_images(path, images)
    hint = ""
    data_files = [name for name in entries
                  if (path / name).is_file() and os.path.splitext(name)[1].lower() in TEXT_SUFFIXES]
    if data_files:
        hint = f" (it holds {data_files[0]}: give that file)"
    raise _fail(path, f"neither a datasets folder (save_to_disk) nor a folder of images "
                      f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)}){hint}")


def _from_datasets(path: Path, text_field: str | None) -> Examples:
    try:
        import datasets
    except ImportError:
        raise _fail(path, "a datasets folder, but the datasets package is not installed: "
                          "pip install 'lambda-gelu[hf]'") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises many kinds here; one line instead of its traceback
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _fail(path, f"datasets cannot load this folder ({detail})") from None
    name = None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if "train" in data:
            name = "train"
        elif len(splits) == 1:
            name = splits[0]
        else:
            raise _fail(path, f"a DatasetDict without a 'train' split (splits: {', '.join(splits) or 'none'})")
        data = data[name]
    where = path / name if name else path
    if len(data) == 0:
        raise _fail(where, "the data set has no rows")
    fields = list(data.column_names)
    string_fields = [f for f in fields if getattr(data.features.get(f), "dtype", None) in ("string", "large_string")]
    field = _pick_field(where, fields, string_fields, text_field)
    if field not in string_fields:
        dtype = getattr(data.features[field], "dtype", type(data.features[field]).__name__)
        raise _fail(where, f"field {field!r} holds {dtype}, not strings")
    texts = list(data[field])
    for row, value in enumerate(texts):
        if value is None:
            raise _fail(where, f"row {row}: field {field!r} is empty (null)")
    return Examples("text", _clean(where, texts, field), None, path, field)


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, hidden files and folders skipped), sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(Path(root, name))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow") from None
    return Image


def _image_problem(path: str | Path, error: Exception) -> str:
    """What is wrong with the image file at ``path``, from the error PIL (or the OS) raised on it."""
    if isinstance(error, OSError) and error.errno is not None:  # missing, unreadable: not PIL's doing
        return f"cannot read the file ({error.strerror or type(error).__name__})"
    reason = str(error).strip()
    if not reason or str(path) in reason or "cannot identify image file" in reason:
        return "not an image PIL can open"
    return f"not an image PIL can open ({reason})"


def _from_images(folder: Path, images: list[Path]) -> Examples:
    relative = [p.relative_to(folder) for p in images]
    top = [p for p in relative if len(p.parts) == 1]
    nested = [p for p in relative if len(p.parts) > 1]
    if top and nested:
        raise _fail(folder, f"images both directly in the folder ({top[0]}) and in sub-folders ({nested[0]}); "
                            "put every image in a class sub-folder, or none")
    Image = _pil_image()
    for image in images:
        try:
            with Image.open(image) as opened:
                opened.verify()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise _fail(image, _image_problem(image, error)) from None
    labels = [p.parts[0] for p in relative] if nested else None
    return Examples("image", images, labels, folder)


def open_image(path: str | Path) -> Any:
    """The image at ``path`` as an RGB ``PIL.Image.Image`` (decoded now); :class:`DataError` if PIL cannot."""
    Image = _pil_image()
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except Exception as error:  # as in _from_images
        raise _fail(path, _image_problem(path, error)) from None


# ----------------------------------------------------------------------------- held-out part


def split_held_out(examples: Examples, fraction: float = 0.1, seed: int = 0) -> tuple[Examples, Examples]:
    """(training, held-out) parts of ``examples``: shuffled with ``seed``, then ``fraction`` of them held out.

    The held-out part has ``round(fraction * n)`` examples, but at least 1, and the training part at least 1;
    both keep the shuffled order. The same examples and seed give the same parts. Fewer than 2 examples
    raise :class:`DataError`; a ``fraction`` outside (0, 1) a ValueError.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    n = len(examples)
    if n < 2:
        raise _fail(examples.source, f"{n} example{'' if n == 1 else 's'}; at least 2 are needed to hold one out")
    held = min(n - 1, max(1, round(fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return examples.subset(order[held:]), examples.subset(order[:held])


# ----------------------------------------------------------------------------- batches


def _positive(name: str, value: Any) -> int:
    """``value`` as an int, if it is a positive integer (a Python or NumPy one, not a bool); else a ValueError."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _chunks(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    size = _positive("batch_size", batch_size)
    return [items[i:i + size] for i in range(0, len(items), size)]


def text_batches(texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int) -> list[Batch]:
    """``texts`` in batches of ``batch_size``, each tokenized by ``tokenizer`` (a Hugging Face tokenizer) as
    ``tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")``: a plain
    dict of tensors (``input_ids``, ``attention_mask``, ...), padded to the batch's longest text."""
    max_length = _positive("max_length", max_length)
    return [dict(tokenizer(list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for chunk in _chunks(list(texts), batch_size)]


def image_batches(paths: Sequence[str | Path], image_processor: Any, batch_size: int) -> list[Batch]:
    """The images at ``paths`` in batches of ``batch_size``, each opened as RGB (:func:`open_image`) and prepared
    by ``image_processor`` (a Hugging Face image processor) as ``image_processor(images=batch,
    return_tensors="pt")``: a plain dict of tensors (``pixel_values``, ...). The images are decoded (and closed)
    one batch at a time."""
    batches = []
    for chunk in _chunks(list(paths), batch_size):
        images = [open_image(path) for path in chunk]
        batches.append(dict(image_processor(images=images, return_tensors="pt")))
    return batches
