"""Reading a bundle: manifest.json, checksums, graph and engine paths, the I/O table.

Standard library only (this file is copied into every bundle's runtime/). The manifest is the
single source of names, shapes, capacities and files; nothing here re-derives them.

`Bundle.load` refuses, with one line naming the field or file:
- a manifest that is not a JSON object of format stagcompile-bundle, or of another
  manifest_version (an older one: re-export; a newer one: upgrade stagcompile);
- a manifest that does not follow the schema (`check_manifest`: the fields the runtime reads,
  with their types, one graph per stack, checksums for every file);
- a path (graph, engine, tokenizer, trace, checksummed file) outside the bundle folder;
- a manifest whose own checksum does not match: `manifest_sha256` is the sha256 of the manifest
  without that field, serialised as canonical JSON (`json.dumps(m, sort_keys=True,
  separators=(",", ":"))`, UTF-8); `write_manifest` sets it, so edit a manifest through it;
- a file whose sha256 differs from its entry in `files` (with `verify`, the default).
A manifest written by a newer stagcompile than this one gets a one-line warning on stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

FORMAT = "stagcompile-bundle"
MANIFEST_VERSION = 2
MANIFEST = "manifest.json"
CHECKSUM = "manifest_sha256"
VERSION = "0.1.0"           # this stagcompile's version (stagcompile.__version__)
DTYPES = ("float32", "float16", "bfloat16")


class BundleError(Exception):
    """A bundle that cannot be used: the message names the file and what was expected."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The manifest's own checksum: sha256 of its canonical JSON without the checksum field."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(root: Path, manifest: dict) -> None:
    """Write root/manifest.json atomically with its checksum (`manifest` gains the field)."""
    manifest[CHECKSUM] = manifest_digest(manifest)
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(Path(root) / MANIFEST)


def _version(text) -> tuple:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


class _Schema:
    """Type and range checks of a manifest; every failure names the field."""

    def __init__(self, manifest: dict, path: Path):
        self.m, self.path = manifest, path

    def fail(self, field: str, what: str):
        raise BundleError(f"{self.path}: field {field} {what}")

    def get(self, parent: dict, key: str, kind, field: str, optional: bool = False):
        if key not in parent or (optional and parent[key] is None):
            if optional:
                return None
            self.fail(field, f"is missing (expected {self.describe(kind)})")
        value = parent[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            self.fail(field, f"should be {self.describe(kind)}, got {type(value).__name__}")
        return value

    @staticmethod
    def describe(kind) -> str:
        return {dict: "an object", list: "a list", str: "a string", int: "an integer",
                bool: "true or false"}.get(kind, str(kind))

    def positive(self, parent: dict, key: str, field: str) -> int:
        value = self.get(parent, key, int, field)
        if value < 1:
            self.fail(field, f"is {value}; expected an integer >= 1")
        return value

    def relpath(self, rel: str, field: str) -> str:
        """A path inside the bundle: relative, no '..', no drive."""
        parts = PurePosixPath(rel.replace("\\", "/")).parts
        if (not rel or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute()
                or PureWindowsPath(rel).drive or ".." in parts):
            self.fail(field, f"{rel!r} is not a path inside the bundle")
        return rel

    def listed(self, rel: str, field: str, files: dict) -> None:
        self.relpath(rel, field)
        if rel not in files:
            self.fail(field, f"{rel!r} has no checksum in files")

    def check(self) -> None:
        m = self.m
        cfg = self.get(m, "config", dict, "config")
        stacks = self.positive(cfg, "num_stacks", "config.num_stacks")
        for key in ("vocab_size", "max_seq_len"):
            self.positive(cfg, key, f"config.{key}")
        if self.get(m, "dtype", str, "dtype") not in DTYPES:
            self.fail("dtype", f"is {m['dtype']!r}; expected one of {', '.join(DTYPES)}")
        self.positive(m, "max_batch", "max_batch")
        files = self.get(m, "files", dict, "files")
        if not files:
            self.fail("files", "is empty (expected a sha256 per file)")
        for rel, digest in files.items():
            self.relpath(rel, f"files[{rel!r}]")
            if not (isinstance(digest, str) and len(digest) == 64
                    and all(c in "0123456789abcdef" for c in digest)):
                self.fail(f"files[{rel!r}]", "should be a sha256 (64 hex digits)")
        graphs = self.get(m, "graphs", dict, "graphs")
        if not graphs:
            self.fail("graphs", "is empty (expected one list of stack graphs per flavour)")
        for flavour in graphs:
            entries = self.get(graphs, flavour, list, f"graphs.{flavour}")
            self.stack_list(entries, stacks, f"graphs.{flavour}")
            for k, entry in enumerate(entries):
                field = f"graphs.{flavour}[{k}]"
                if not isinstance(entry, dict):
                    self.fail(field, "should be an object with a file")
                self.listed(self.get(entry, "file", str, f"{field}.file"), f"{field}.file", files)
        self.io_tables(self.get(m, "io", list, "io"), stacks, "io")
        ort = self.get(m, "ort", dict, "ort", optional=True)
        if ort is not None and "ort" in graphs:
            self.io_tables(self.get(ort, "io", list, "ort.io"), stacks, "ort.io")
        caches = self.get(m, "caches", dict, "caches")
        self.get(caches, "unbounded_length", bool, "caches.unbounded_length")
        engines = self.get(m, "engines", dict, "engines", optional=True)
        if engines is not None:
            plans = self.get(engines, "files", list, "engines.files")
            self.stack_list(plans, stacks, "engines.files")
            for k, rel in enumerate(plans):
                if not isinstance(rel, str):
                    self.fail(f"engines.files[{k}]", "should be a string")
                self.listed(rel, f"engines.files[{k}]", files)
        tok = self.get(m, "tokenizer", str, "tokenizer", optional=True)
        if tok is not None:
            self.listed(tok, "tokenizer", files)
        quant = self.get(m, "quant", dict, "quant", optional=True)
        if quant is not None and self.get(quant, "bits", int, "quant.bits") not in (4, 8):
            self.fail("quant.bits", f"is {quant['bits']}; expected 4 or 8")
        if quant is not None:
            self.positive(quant, "block_size", "quant.block_size")
        validation = self.get(m, "validation", dict, "validation", optional=True)
        if validation is not None:
            self.listed(self.get(validation, "trace", str, "validation.trace"),
                        "validation.trace", files)
        self.get(m, "versions", dict, "versions")

    def io_tables(self, ios: list, stacks: int, name: str) -> None:
        """One {inputs, outputs} table per stack, each tensor with a name, dtype and shape."""
        self.stack_list(ios, stacks, name)
        for k, io in enumerate(ios):
            if not isinstance(io, dict):
                self.fail(f"{name}[{k}]", "should be an object with inputs and outputs")
            for kind in ("inputs", "outputs"):
                for i, t in enumerate(self.get(io, kind, list, f"{name}[{k}].{kind}")):
                    field = f"{name}[{k}].{kind}[{i}]"
                    if not isinstance(t, dict):
                        self.fail(field, "should be an object with name, dtype and shape")
                    self.get(t, "name", str, f"{field}.name")
                    self.get(t, "dtype", str, f"{field}.dtype")
                    for d in self.get(t, "shape", list, f"{field}.shape"):
                        if not isinstance(d, (int, str)) or isinstance(d, bool):
                            self.fail(f"{field}.shape", f"has {d!r}; expected integers or names")

    def stack_list(self, items: list, stacks: int, field: str) -> None:
        if len(items) != stacks:
            self.fail(field, f"has {len(items)} entries; expected one per stack "
                             f"(config.num_stacks={stacks})")


def check_manifest(manifest: dict, path: Path) -> None:
    """Raise BundleError naming the first field that breaks the schema."""
    _Schema(manifest, path).check()


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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: not a stagcompile manifest (field format should be "
                              f"{FORMAT!r})")
        versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
        writer = versions.get("stagcompile")
        version = manifest.get("manifest_version")
        newer = isinstance(version, int) and not isinstance(version, bool)
        if newer and version > MANIFEST_VERSION:
            raise BundleError(f"{path}: manifest_version {version} is newer than this stagcompile "
                              f"{VERSION} reads ({MANIFEST_VERSION}); it was written by "
                              f"stagcompile {writer}: upgrade stagcompile to run it")
        if version != MANIFEST_VERSION:
            raise BundleError(
                f"{path}: manifest_version {version!r} is not supported by this stagcompile "
                f"(expects {MANIFEST_VERSION}); re-export the bundle with this version "
                f"(it was written by stagcompile {writer})")
        check_manifest(manifest, path)
        if manifest.get(CHECKSUM) != manifest_digest(manifest):
            what = "has no" if CHECKSUM not in manifest else "does not match its"
            raise BundleError(f"{path}: {what} {CHECKSUM} (the manifest changed after it was "
                              "written; re-export the bundle)")
        bundle = cls(root, manifest)
        bundle.check_paths()
        if _version(writer) > _version(VERSION):
            print(f"warning: {path}: written by stagcompile {writer}, newer than this one "
                  f"({VERSION}); upgrade if something fails", file=sys.stderr)
        if verify:
            bundle.verify()
        return bundle

    def check_paths(self) -> None:
        """Refuse checksummed files that resolve outside the bundle folder (through links)."""
        top = self.root.resolve()
        for rel in self.manifest["files"]:
            target = (self.root / rel).resolve()
            if top != target and top not in target.parents:
                raise BundleError(f"{self.root / MANIFEST}: field files[{rel!r}] points outside "
                                  f"the bundle ({target})")

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
    def quant(self) -> dict | None:
        """The manifest's `quant` section (weight-only quantization), None for full weights."""
        return self.manifest.get("quant")

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
        """Rewrite manifest.json (after build adds engines), atomically, with its checksum."""
        write_manifest(self.root, self.manifest)
