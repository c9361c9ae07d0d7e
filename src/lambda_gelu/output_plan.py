"""Every output of a command, checked before any work, and held by one writer.

:func:`planned_outputs` is the one step every command goes through (``cli.main``
calls it with the command's outputs and inputs). Before the command starts, each
output is resolved to where its write lands and checked:

* distinct from the other outputs and from every input (and not a folder that
  holds one, nor the working folder or one above it);
* a file where a file goes and a folder where a folder goes;
* no dangling symlink (a typo'd link target) unless ``force``;
* in a folder that exists and can be written, or can be made;
* not existing, unless ``force`` (or the output is one that may exist, such
  as a run-state folder, which :func:`lambda_gelu.resume.open_run_state` checks).

Then a lock beside each output, ``.<name>.lock`` (``fcntl.flock``, so that a
killed run leaves no lock held), is taken for the whole run: a second run that
writes the same path refuses in one line. The lock file is removed at the end,
and so are the folders made for it if they are still empty. Without ``fcntl``
(Windows) the outputs are checked but not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambda_gelu.outputs import OutputExistsError, missing_parents, remove_empty

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class OutputPlanError(ValueError):
    """An output that cannot be written as asked: reported in one line before any work."""


class OutputBusyError(OutputPlanError):
    """Another run holds the lock of an output."""


@dataclass(frozen=True)
class Output:
    """One path a command will write: ``kind`` "file" or "folder"; ``option`` names it in messages."""

    path: Path
    kind: str
    option: str
    may_exist: bool = False  # checked elsewhere (a run state resumed with --resume)


def landing(path: str | Path) -> Path:
    """Where a write to ``path`` lands: its folder resolved, its own name kept (a link there is replaced).

    The folder is resolved as the OS will (``link/..`` is the folder above the link's target, not the folder
    holding the link), which ``os.path.abspath`` alone would get wrong.
    """
    head, name = os.path.split(os.fspath(path))
    if name in ("", ".", ".."):
        return Path(os.path.realpath(path or "."))
    return Path(os.path.realpath(os.path.join(os.getcwd(), head or "."))) / name


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _writable_folder(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process can write in."""
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPlanError(f"{option} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPlanError(f"{option} {path}: cannot write in {folder} (read-only or no permission)")


def check_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, str | Path]], force: bool) -> list[Path]:
    """Check ``outputs`` against each other, the ``inputs`` (option, path) and the disk; returns their landings.

    Raises :class:`OutputPlanError` (or :class:`~lambda_gelu.outputs.OutputExistsError` for an existing output
    without ``force``) with one line naming the option and the path.
    """
    cwd = Path.cwd().resolve()
    sources = [(option, Path(path).resolve()) for option, path in inputs if path]
    landed: list[tuple[Output, Path]] = []
    for out in outputs:
        where = landing(out.path)
        shown = f"{out.option} {out.path}"
        if _within(cwd, where):
            raise OutputPlanError(f"{shown} is the working folder or holds it; name a new path")
        for option, source in sources:
            if _within(source, where):
                what = "is" if source == where else "holds"
                raise OutputPlanError(f"{shown} {what} the input {option} {source}; name another path")
        for other, other_where in landed:
            if _within(where, other_where) or _within(other_where, where):
                raise OutputPlanError(f"{shown} and {other.option} {other.path} are the same path or one holds the "
                                      "other; name two separate paths")
        if os.path.islink(where) and not where.exists() and not force:
            raise OutputPlanError(f"{shown} is a symlink to a missing {os.readlink(where)}; pass --force to replace "
                                  "the link, or name another path")
        if where.is_dir() and out.kind == "file":
            raise OutputPlanError(f"{shown} is a folder; {out.option} names a file")
        if where.exists() and not where.is_dir() and out.kind == "folder":
            raise OutputPlanError(f"{shown} is a file; {out.option} names a folder")
        if where.exists() and not force and not out.may_exist:
            raise OutputExistsError(f"{out.path} already exists; pass --force to replace it")
        _writable_folder(where, out.option)
        landed.append((out, where))
    return [where for _, where in landed]


def _open_in_new_folder(lock_path: Path) -> Any:
    """Make ``lock_path``'s folder and open the file; retried when another run removes a folder it just made."""
    tries = 5
    while True:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            return open(lock_path, "a+")  # held for the block
        except FileNotFoundError:
            tries -= 1
            if not tries:
                raise


@contextlib.contextmanager
def output_lock(where: Path, option: str) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``where`` for the block; another holder makes it raise OutputBusyError."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    created = missing_parents(where)
    lock_path = where.parent / f".{where.name}.lock"
    handle = None
    try:
        while True:  # the file may be removed by its holder between our open and our lock: retry on a new one
            handle = _open_in_new_folder(lock_path)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                handle = None
                raise OutputBusyError(f"{option} {where} is being written by another run ({holder}); wait for it "
                                      "or name another path") from None
            if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            handle.close()
        remove_empty(created)


@contextlib.contextmanager
def planned_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, str | Path]] = (), *,
                    force: bool = False, lock: bool = True) -> Iterator[list[Path]]:
    """``with planned_outputs(...) as paths:`` :func:`check_outputs`, then one :func:`output_lock` per output.

    ``lock=False`` (a non-zero torchrun rank, whose rank 0 holds the locks) only checks.
    """
    paths = check_outputs(outputs, inputs, force)
    with contextlib.ExitStack() as stack:
        if lock:
            for out, where in zip(outputs, paths, strict=True):
                stack.enter_context(output_lock(where, out.option))
            check_outputs(outputs, inputs, force)  # again under the locks: a run that ended meanwhile wrote them
        yield paths
