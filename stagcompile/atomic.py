"""Write a folder atomically: build it under a temporary name beside the target, then rename.

A failed stage leaves nothing behind; an existing target is replaced only with `force`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from stagcompile.errors import StagError


@contextmanager
def atomic_dir(path: Path, force: bool = False, what: str = "output"):
    path = Path(path)
    if path.exists() and not force:
        raise StagError(f"{path}: already exists; pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise StagError(f"{path}: exists and is not a folder")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)                 # mkdtemp makes 0700; use the usual mode
    except OSError as exc:
        raise StagError(f"{path}: cannot write the {what} folder here ({exc.strerror or exc})") \
            from None
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
