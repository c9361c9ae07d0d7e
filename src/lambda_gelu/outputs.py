"""Writing results without losing what is already on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


def umask_mode(folder: bool) -> int:
    """The mode ``open``/``mkdir`` would give a new file (0o666) or folder (0o777) under this process's umask.

    ``tempfile.mkstemp``/``mkdtemp`` make private (0600/0700) files and folders; what they become (a checkpoint,
    a run folder) follows the umask instead, as other tools' outputs do.
    """
    return (0o777 if folder else 0o666) & ~current_umask()


def current_umask() -> int:
    """This process's umask, read from /proc where it can be (setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # the brief value is the safe one: nothing made meanwhile is more open than asked
    os.umask(mask)
    return mask


def missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, innermost first (what a ``mkdir(parents=True)`` makes)."""
    return [p for p in [path.parent, *path.parent.parents] if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that is empty: leave the disk as it was before they were made."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write ``path`` as ``write(tmp)`` writes a temporary file beside it; then fsync, rename, fsync the folder.

    A crash at any point leaves either the old file or the new one at ``path``, never a mixture; if the write
    fails, the temporary file and any folder made for it are removed. The file's mode follows the umask
    (``mkstemp`` would leave 0600).
    """
    path = Path(path)
    created = missing_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, umask_mode(folder=False))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        remove_empty(created)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` (newlines as given)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))


def check_writable(path: str | Path, force: bool) -> Path:
    """Refuse an existing ``path`` unless ``force``; make sure its parent can be created."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputExistsError(f"{path.parent} is not a directory")
    return path


@contextmanager
def staged_dir(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final`` that replaces it only once the block succeeds.

    If the block raises, the temporary folder (and any parent folder made for
    it) is removed and ``final`` (if it existed) is untouched. An existing ``final`` is replaced only with ``force``.
    """
    final = check_writable(final, force)
    created = missing_parents(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    stage.chmod(umask_mode(folder=True))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_empty(created)
        raise
    old = None
    try:
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / final.name)
        stage.rename(final)
    except BaseException:  # the swap failed: put the old output back, leave no staging folder
        if old is not None:
            if (old / final.name).exists() and not final.exists():
                (old / final.name).rename(final)
            with contextlib.suppress(OSError):
                old.rmdir()  # only once emptied: never delete what the user had
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
