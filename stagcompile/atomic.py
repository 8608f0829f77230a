"""Write a folder atomically: build it under a temporary name beside the target, then rename.

A failed stage leaves nothing behind, nor does an interrupted one (Ctrl-C, or SIGTERM: while the
folder is being built SIGTERM raises `Terminated`, so the staging folder is removed). What may be
replaced is checked before anything is written:

- the target may never be, or contain, one of the stage's inputs (`sources`) or the current
  folder (`export CKPT -o CKPT`, `-o` a parent of CKPT, `-o .` are refused);
- an existing target is replaced only with `force`, and only when it is what the stage writes
  (`what`: a stagcompile bundle, i.e. a manifest.json of format stagcompile-bundle, or a
  checkpoint, i.e. config.json + model.safetensors) or an empty folder. `--force` never wipes
  another folder.

`write_text_atomic` does the same for one file (a temporary file, then rename); `check_writable`
refuses a file path that cannot be written before a long stage starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from stagcompile.config import CONFIG_FILE, WEIGHTS_FILE
from stagcompile.errors import StagError, Terminated
from stagcompile.runtime.bundle import FORMAT, MANIFEST


def is_bundle(path: Path) -> bool:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


OWNERS = {"bundle": (is_bundle, f"a stagcompile bundle ({MANIFEST} of format {FORMAT})"),
          "checkpoint": (is_checkpoint, f"a checkpoint ({CONFIG_FILE} and {WEIGHTS_FILE})")}


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_target(path: Path, force: bool, what: str, sources=()) -> None:
    """Refuse a target that is or contains an input or the current folder, an existing target
    without `force`, and (with `force`) one that is not a `what` or an empty folder."""
    target = Path(path).resolve()
    named = [(Path(s), f"the input {s}") for s in sources]
    for src, label in named + [(Path.cwd(), "the current folder")]:
        if _contains(target, src.resolve()):
            relation = "is" if target == src.resolve() else "contains"
            raise StagError(f"{path}: {relation} {label}; write the {what} to another folder")
    if not os.path.lexists(path):
        return
    if not force:
        raise StagError(f"{path}: already exists; pass --force to replace it")
    if not Path(path).is_dir():
        raise StagError(f"{path}: exists and is not a folder")
    owned, description = OWNERS.get(what, (lambda p: False, f"a {what}"))
    if any(Path(path).iterdir()) and not owned(path):
        raise StagError(f"{path}: not {description}; --force only replaces a {what} (or an "
                        "empty folder): remove it yourself or choose another folder")


@contextmanager
def terminate_raises():
    """While active (main thread only), SIGTERM raises `Terminated` instead of killing the
    process, so `finally` and `except` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def atomic_dir(path: Path, force: bool = False, what: str = "output", sources=()):
    check_target(path, force, what, sources)
    path = Path(os.path.abspath(path))        # "." and ".." resolved lexically, links kept
    parent = path.parent
    with terminate_raises():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=parent))
            tmp.chmod(_mode(0o777))               # mkdtemp makes 0700; use the usual mode
        except OSError as exc:
            raise StagError(f"{path}: cannot write the {what} folder here "
                            f"({exc.strerror or exc})") from None
        try:
            yield tmp
            _swap(tmp, path, what)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap(tmp: Path, path: Path, what: str) -> None:
    """Move `tmp` to `path`, replacing an existing folder; on failure `path` is as it was."""
    def failed(exc: OSError) -> StagError:
        return StagError(f"{path}: cannot write the {what} here ({exc.strerror or exc})")

    if not os.path.lexists(path):
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise failed(exc) from None
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    try:
        os.replace(path, old / "x")
    except OSError as exc:
        old.rmdir()
        raise failed(exc) from None
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        os.replace(old / "x", path)
        old.rmdir()
        if isinstance(exc, OSError):
            raise failed(exc) from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _mode(base: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def check_writable(path: Path, label: str | None = None) -> None:
    """Refuse, before any work is done, a file path that cannot be written: a folder, or a place
    with no writable folder. `label` (default: the path) starts the message, e.g. a flag."""
    path = Path(path)
    label = label or str(path)
    if path.is_dir() or not path.name:
        raise StagError(f"{label}: is a folder; expected a file")
    if path.exists() and not path.is_file():
        raise StagError(f"{label}: is not a regular file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise StagError(f"{label}: cannot write it ({folder} is not a writable folder)")


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    """Write `path` through a temporary file and a rename; a one-line StagError if it cannot be
    written (nothing half-written is left)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _mode(0o666))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise StagError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
