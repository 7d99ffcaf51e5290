"""The run directory: one folder per stage, atomic writes, and the manifests that let `run` skip finished stages.

A stage's folder appears at its final path only when complete: it is built under a temporary name in the same
run directory and renamed into place. Its `manifest.json` records the stage's fingerprint (config section, upstream
fingerprints, input hashes, versions); a later run whose fingerprint matches skips the stage.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.errors import MedtuneError

MANIFEST = "manifest.json"
# Each stage's folder in a run directory (medtune.pipeline.STAGES says which stage writes which).
PAIRS, PREPARED, ADAPTER, MERGED, GGUF, EVAL = "pairs", "prepared", "adapter", "merged", "gguf", "eval"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able data (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename: `path` is either old or complete, never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


class RunDir:
    """The folder of one run: `prepared/`, `adapter/`, `merged/`, `gguf/`, `eval/`, each with a manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def read_json(self, stage: str, name: str) -> dict[str, Any] | None:
        """A JSON file of a stage's folder, or None when it is missing or unreadable."""
        path = self.root / stage / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return self.read_json(stage, MANIFEST)

    def missing_files(self, stage: str, reads: tuple[str, ...] | None = None) -> list[str]:
        """Files the stage's manifest lists (those matching `reads`, glob patterns; default all) that are absent or
        of another size: a partial copy of a run."""
        manifest = self.manifest(stage) or {}
        folder = self.root / stage
        return [f["path"] for f in manifest.get("files", [])
                if (reads is None or any(fnmatch.fnmatch(f["path"], pattern) for pattern in reads))
                and (not (folder / f["path"]).is_file() or (folder / f["path"]).stat().st_size != f["bytes"])]

    def is_complete(self, stage: str) -> bool:
        return self.manifest(stage) is not None and not self.missing_files(stage)

    def require(self, stage: str, hint: str, reads: tuple[str, ...] | None = None) -> Path:
        """The folder of a finished upstream stage whose files (those the caller `reads`; default all) are there as
        its manifest lists them, or a clear error saying which command makes it."""
        if self.manifest(stage) is None:
            raise MedtuneError(f"{self.root / stage}: not found or incomplete; run `{hint}` first")
        missing = self.missing_files(stage, reads)
        if missing:
            raise MedtuneError(f"{self.root / stage}: {len(missing)} file(s) its manifest lists are missing or of "
                               f"another size ({', '.join(missing[:3])}); run `{hint}` again")
        return self.root / stage

    def is_current(self, stage: str, fp: str) -> bool:
        manifest = self.manifest(stage)
        return manifest is not None and manifest.get("fingerprint") == fp

    @contextlib.contextmanager
    def atomic(self, stage: str) -> Iterator[Path]:
        """Yield an empty temporary folder; on success it replaces `<run>/<stage>` in one rename."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{stage}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # left behind by a killed run
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}.", suffix=".partial"))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a run's outputs are meant to be shared
        try:
            yield tmp
            _fsync_tree(tmp)
            final = self.root / stage
            old = None
            if final.exists():
                old = self.root / f".{stage}.old.partial"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_manifest(folder: Path, stage: str, fp: str, config: dict[str, Any], results: dict[str, Any],
                   run: dict[str, Any] | None = None) -> None:
    """The manifest lists every file of the stage with size and sha256, so a user can verify what they got; `run`
    records when and on what machine the stage ran (times, versions, device)."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files.append({"path": str(path.relative_to(folder)), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    atomic_write_json(
        folder / MANIFEST,
        {
            "stage": stage,
            "fingerprint": fp,
            "medtune_version": __version__,
            "config": config,
            "results": results,
            "files": files,
            **({"run": run} if run is not None else {}),
        },
    )
