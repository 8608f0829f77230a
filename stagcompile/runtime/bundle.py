"""Reading a bundle: manifest.json, checksums, graph and engine paths, the I/O table.

Standard library only (this file is copied into every bundle's runtime/). The manifest is the
single source of names, shapes, capacities and files; nothing here re-derives them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "stagcompile-bundle"
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle that cannot be used: the message names the file and what was expected."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def load(cls, root: Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{path}: file not found (is {root} a stagcompile bundle? "
                              "create one with `stagcompile export` or `stagcompile compile`)")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: not a stagcompile manifest (field format should be "
                              f"{FORMAT!r})")
        version = manifest.get("manifest_version")
        if version != MANIFEST_VERSION:
            raise BundleError(
                f"{path}: manifest_version {version!r} is not supported by this stagcompile "
                f"(expects {MANIFEST_VERSION}); re-export the bundle with this version "
                f"(it was written by stagcompile {manifest.get('versions', {}).get('stagcompile')})")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self, only: list[str] | None = None) -> None:
        """Check that every listed file exists and matches its sha256."""
        files = self.manifest.get("files", {})
        for rel in only if only is not None else files:
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"{path}: file listed in {MANIFEST} is missing")
            if rel in files and sha256(path) != files[rel]:
                raise BundleError(f"{path}: checksum mismatch (the file changed after export; "
                                  "re-export the bundle)")

    # ---- accessors ---------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def num_stacks(self) -> int:
        return self.config["num_stacks"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def flavours(self) -> list[str]:
        return list(self.manifest["graphs"])

    def io(self, stack: int, flavour: str = "portable") -> dict:
        """I/O table of 1-based `stack` in `flavour`: {"inputs": [...], "outputs": [...]}. The
        portable and plugin flavours share one table; the ort flavour has its own."""
        if flavour == "ort":
            return self.manifest["ort"]["io"][stack - 1]
        return self.manifest["io"][stack - 1]

    def graph(self, flavour: str, stack: int) -> Path:
        if flavour not in self.manifest["graphs"]:
            raise BundleError(f"{self.root / MANIFEST}: no {flavour!r} graphs in this bundle "
                              f"(it has {', '.join(self.flavours)}); export with "
                              f"--flavour {flavour} or all")
        path = self.root / self.manifest["graphs"][flavour][stack - 1]["file"]
        if not path.is_file():
            raise BundleError(f"{path}: graph of stack {stack} ({flavour}) is missing")
        return path

    def engine(self, stack: int) -> Path:
        engines = self.manifest.get("engines")
        if not engines:
            raise BundleError(f"{self.root}: no TensorRT engines; run `stagcompile build "
                              f"{self.root}` on the target GPU first")
        path = self.root / engines["files"][stack - 1]
        if not path.is_file():
            raise BundleError(f"{path}: engine of stack {stack} is missing")
        return path

    @property
    def tokenizer(self) -> Path | None:
        rel = self.manifest.get("tokenizer")
        return self.root / rel if rel else None

    def write_manifest(self) -> None:
        """Rewrite manifest.json (after build adds engines), atomically."""
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        tmp.replace(self.root / MANIFEST)
