"""Resumable runs: the run-state checkpoint, its atomic write, and stopping cleanly on SIGTERM / SIGINT.

A run state is one safetensors file, ``state-<step>.safetensors``, in a state
folder. Its tensors are the model's weights, the optimizer's state (Adam
moments, step counts, and the hardness group's running RMS, which lives in the
optimizer's param group), the frozen teacher of a distilling Hardener, the
losses so far and the torch RNG states; the header holds as JSON the rest:
step, config, the Hardener's schedule state and targets, the position in the
data order, Python's and NumPy's RNG states, the library and torch versions,
the caller's metadata and a SHA-256 digest of every tensor. No pickle is
written or read anywhere.

Files are written by :func:`lambda_gelu.checkpoint.write_safetensors`
(temporary file, fsync, rename, fsync of the folder), so a crash during a
write leaves the previous state as it was; the newest ``keep`` states are
kept. Loading checks the container, every digest, and (when restored into a
model) every name, shape and λ, and reports a problem with the file's path and
the tensor's name.

:class:`GracefulStop` turns the first SIGTERM or SIGINT into a request that
:func:`lambda_gelu.train.fit` honours at the next step boundary: it saves the
state and raises :class:`TrainingInterrupted`; a second signal interrupts at once
(the last complete state on disk is still intact). :func:`fit` also saves the
state when its last step is done, so a stop while the command evaluates or
writes its outputs resumes without training again. Outside a training loop,
:func:`sigterm_as_interrupt` makes SIGTERM stop a command as Ctrl-C (SIGINT)
does: cleanup runs, and the command says what happened.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import random
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lambda_gelu import distributed
from lambda_gelu.checkpoint import CheckpointError, check_fields, write_safetensors

STATE_FORMAT = 2  # 2: λ stored as log λ (0.1 wrote 1, with log(λ − 1))
STATE_KEY = "lambda_gelu_state"
_NAME = re.compile(r"^state-(\d{8,})\.safetensors$")
log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped on a signal after saving its state (``path``; None if it had nowhere to save)."""

    def __init__(self, step: int, total: int, path: Path | None, signum: int) -> None:
        self.step, self.total, self.path, self.signum = step, total, path, signum
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        where = f"saved the run state to {path}" if path else "no state saved (no checkpoint folder)"
        super().__init__(f"interrupted by {name} after step {step} of {total}; {where}")


# ---------------------------------------------------------------- signals


class GracefulStop:
    """Context manager: the first SIGTERM/SIGINT only sets :attr:`signum`; a second one raises KeyboardInterrupt.

    Installed only in the main thread (signal handlers cannot be set elsewhere);
    nested uses share the outermost one. :func:`stop_requested` reads it.
    """

    _active: GracefulStop | None = None

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._installed = False

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> GracefulStop:
        if GracefulStop._active is not None or threading.current_thread() is not threading.main_thread():
            return GracefulStop._active or self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        GracefulStop._active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            GracefulStop._active = None
            self._installed = False


def stop_requested() -> int | None:
    """The signal number a :class:`GracefulStop` caught, or None."""
    active = GracefulStop._active
    return None if active is None else active.signum


# ---------------------------------------------------------------- nested state <-> (tensors, JSON)


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; its tensors go to ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
        return {"__dict__": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in obj.items()], "int_keys": True}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {key} in a run state")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__dict__" in obj:
            convert = int if obj.get("int_keys") else str
            return {convert(k): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and every CUDA device), Python's ``random``, NumPy's legacy global."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the state file


@dataclass
class RunState:
    """Everything :func:`lambda_gelu.train.fit` needs to continue a run exactly where it stopped."""

    path: Path
    step: int
    body: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """One part of the state (``model``, ``optimizer``, ``hardener``, ``rng``, ...)."""
        return self.body.get(key, default)


def _versions() -> dict[str, str]:
    from lambda_gelu.version import __version__

    return {"lambda_gelu": __version__, "torch": torch.__version__}


def save_state(path: str | Path, step: int, body: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Write a run state to ``path`` atomically (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(body, "s", tensors)
    header = {
        "format": STATE_FORMAT,
        "step": step,
        "versions": _versions(),
        "meta": meta or {},
        "body": skeleton,
        "digests": {key: _digest(value) for key, value in tensors.items()},
    }
    header["header_sha256"] = _header_digest(header)
    return write_safetensors(path, tensors, {STATE_KEY: json.dumps(header)})


def _header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the JSON fields a resume reads (step, meta, the body's skeleton, the tensors' digests)."""
    fields = {key: header.get(key) for key in ("step", "meta", "body", "digests")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def load_state(path: str | Path) -> RunState:
    """Read and verify a run state; CheckpointError names the file (and the tensor) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run state")
    try:
        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {}).get(STATE_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable run state ({str(error).splitlines()[0]})") from None
    if raw is None:
        raise CheckpointError(f"{path}: not a lambda-gelu run state")
    try:
        header = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: the run state's header is not valid JSON") from None
    check_fields(path, header, {"format": int}, "run state")
    if header.get("format") == 1:
        raise CheckpointError(
            f"{path}: a run state of lambda-gelu 0.1, whose optimizer state is for 0.1's storage of λ; "
            "start the run again (its checkpoints still load)"
        )
    if header.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: unsupported run-state format {header.get('format')!r}")
    check_fields(path, header, {"step": int, "meta": dict, "body": dict, "digests": dict}, "run state")
    if "header_sha256" in header and header["header_sha256"] != _header_digest(header):  # states since 0.2
        raise CheckpointError(f"{path}: the run state's header is corrupted (checksum mismatch)")
    if header["step"] < 0:
        raise CheckpointError(f"{path}: the run state's field 'step' is {header['step']}, not a step count")
    digests = header["digests"]
    if set(digests) != set(tensors):
        missing = sorted(set(digests) - set(tensors))[:3]
        raise CheckpointError(f"{path}: run state is incomplete (missing {missing})")
    for key, value in tensors.items():
        if _digest(value) != digests[key]:
            raise CheckpointError(f"{path}: {key.removeprefix('s/')} is corrupted (checksum mismatch)")
    try:
        body = _unflatten(header["body"], tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed run state ({type(error).__name__}: {error})") from None
    check_fields(path, body, {"config": dict, "model": dict, "optimizer": dict, "data": dict,
                              "losses": torch.Tensor, "rng": list}, "run state", "body")
    if not body["rng"]:
        raise CheckpointError(f"{path}: the run state's field 'body.rng' is empty")
    for i, entry in enumerate(body["rng"]):
        _check_rng(path, entry, f"body.rng[{i}]")
    return RunState(path=path, step=header["step"], body=body, meta=header["meta"])


def _check_rng(path: Path, entry: Any, field_name: str) -> None:
    """CheckpointError unless ``entry`` is an RNG state this process can take (tried, then undone)."""
    mine = rng_state()
    try:
        set_rng_state(entry)
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path}: the run state's field '{field_name}' is not an RNG state of this "
                              f"process ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                              ) from None
    finally:
        set_rng_state(mine)


def _newest_good_state(paths: list[Path]) -> RunState | None:
    """The newest of ``paths`` that loads; a damaged newer one is named in a warning (all damaged: its error)."""
    newest_error = None
    for path in reversed(paths):
        try:
            state = load_state(path)
        except CheckpointError as error:
            newest_error = newest_error or error
            continue
        if newest_error is not None:
            log.warning("%s; resuming from the older state %s (step %d)", newest_error, path, state.step)
        return state
    if newest_error is not None:
        raise newest_error
    return None


def state_paths(folder: str | Path) -> list[Path]:
    """The complete run states in ``folder``, oldest first (temporary files of an interrupted write are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class Checkpointer:
    """Where and how often :func:`lambda_gelu.train.fit` saves its run state, and the state to resume from.

    Args:
        folder: the state folder (created on the first save).
        every: also save every ``every`` steps (0: only when stopped by a signal,
            by too many non-finite steps, and when the last step is done).
        keep: how many of the newest states to keep.
        meta: JSON metadata stored with every state (e.g. what the run is), for
            the caller to compare on resume.
        resume: load the newest state in ``folder`` now, for fit to continue from.
    """

    def __init__(
        self,
        folder: str | Path,
        every: int = 0,
        keep: int = 2,
        meta: dict[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        if every < 0 or keep < 1:
            raise ValueError(f"need every >= 0 and keep >= 1, got every={every}, keep={keep}")
        self.folder = Path(folder)
        self.every = every
        self.keep = keep
        self.meta = meta or {}
        self.last_saved: Path | None = None
        self.saved: list[Path] = []
        self.resume_state: RunState | None = None
        if resume:
            self.resume_state = _newest_good_state(state_paths(self.folder))
            self.last_saved = self.resume_state.path if self.resume_state else None

    def due(self, step: int) -> bool:
        """Whether a periodic save falls after ``step`` completed steps."""
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, body: dict[str, Any]) -> Path:
        """Write the state after ``step`` steps (rank 0 only; others just learn the path), prune old ones."""
        path = self.folder / f"state-{step:08d}.safetensors"
        if distributed.is_main():
            save_state(path, step, body, self.meta)
            for old in state_paths(self.folder)[: -self.keep]:
                old.unlink(missing_ok=True)
            for stale in self.folder.glob(".state-*.tmp"):  # left by a write that was killed
                stale.unlink(missing_ok=True)
        distributed.barrier()
        self.last_saved = path
        self.saved.append(path)
        return path

    def clear(self) -> None:
        """Remove the state folder (once the run's final output is safely written)."""
        if distributed.is_main() and self.folder.is_dir():
            for path in self.folder.iterdir():
                if _NAME.match(path.name) or path.name.startswith(".state-"):
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop, raised where SIGINT raises KeyboardInterrupt."""

    signum = signal.SIGTERM


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """``with sigterm_as_interrupt():`` a SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the block.

    Without it a SIGTERM ends Python at once: no ``finally`` runs, staged
    outputs stay behind and nothing is said. Only the main thread can set
    handlers; elsewhere the block runs unchanged. A :class:`GracefulStop` inside
    the block takes over while it is active.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def saved_states(out: str | Path) -> list[Path]:
    """The state folders beside ``out`` that hold a run state: ``<out>.state`` and ``<out>.<part>.state``."""
    out = Path(out)
    folders = [state_folder(out), *sorted(out.parent.glob(glob.escape(out.name) + ".*.state"))]
    return [folder for folder in folders if state_paths(folder)]


@contextlib.contextmanager
def graceful_stop() -> Iterator[GracefulStop]:
    """``with graceful_stop():`` -- see :class:`GracefulStop`."""
    with GracefulStop() as stop:
        yield stop


def state_folder(out: str | Path) -> Path:
    """The state folder of a command whose final output is ``out``: ``<out>.state`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".state")


def open_run_state(
    out: str | Path,
    run: dict[str, Any],
    *,
    resume: bool,
    force: bool,
    every: int = 0,
) -> Checkpointer:
    """The Checkpointer of a command that writes ``out`` (see :func:`state_folder`).

    ``run`` describes the run (its options, as JSON values). Without ``resume``
    an existing state is refused unless ``force`` (which discards it); with
    ``resume`` the newest state is loaded and must have been saved by a run
    with the same ``run``; with nothing saved yet, the run starts from step 0.
    Raises ValueError (FileExistsError for a refused state) with one clear line.
    """
    from lambda_gelu.kernels import COMPILE_ENV, compile_mode
    from lambda_gelu.outputs import OutputExistsError

    folder = state_folder(out)
    # the kernels' compile mode changes the arithmetic: a resume under another one would not be bitwise
    run = json.loads(json.dumps(dict(run, compile_mode=compile_mode())))  # as after a trip through the file
    if not resume and state_paths(folder):
        if not force:
            raise OutputExistsError(
                f"{folder} holds a saved run state; pass --resume to continue it or --force to start over"
            )
        Checkpointer(folder).clear()
    checkpointer = Checkpointer(folder, every=every, meta={"run": run}, resume=resume)
    saved = checkpointer.resume_state
    if saved is not None:
        before = saved.meta.get("run", {})
        for key in sorted(set(before) | set(run)):
            if key == "compile_mode" and key not in before:
                continue  # saved before the mode was recorded
            if before.get(key) != run.get(key):
                how = f"set {COMPILE_ENV} as it was" if key == "compile_mode" else "resume with the same options"
                raise ValueError(
                    f"{saved.path}: the saved run has {key}={before.get(key)!r}, this command {key}={run.get(key)!r}; "
                    + how
                )
    return checkpointer
