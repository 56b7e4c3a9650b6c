"""Atomic artifacts: write into a temp path beside the destination, move into place, manifest last.

A folder with a `manifest.json` is complete; one without is debris from a crash and is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@contextmanager
def atomic_dir(dest: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `dest` in one rename, on error it is removed.

    `keep_existing`, for caches that two runs may fill at once with the same content: a complete `dest` (with its
    manifest) that another process finished first is kept and this copy dropped, so a reader never sees the
    folder vanish under it and neither writer fails."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should read like any other
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing:
        if not (dest / MANIFEST).exists():
            shutil.rmtree(dest, ignore_errors=True)  # debris of a writer that died; a complete one is never removed
            try:
                os.rename(tmp, dest)  # fails when another writer's folder got there first
                return
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    """Written last: its presence says every other file of `folder` is complete."""
    return atomic_write_text(Path(folder) / MANIFEST, json.dumps(data, indent=2, default=str))


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; the stage that wrote it did not finish")
    return json.loads(path.read_text())


def save_model(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """A model and its tokenizer as safetensors into `folder` (usually an `atomic_dir`). Trainers switch the KV
    cache off in the config; it is switched back on, or every later `generate` runs ~5x slower. `state_dict`: the
    full weights gathered from a sharded (FSDP/ZeRO-3) model, whose own parameters are only this process's shard."""
    model.config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def content_hash(path: str | Path) -> str:
    """sha256 over a file, or over a folder's files (relative names and bytes, in name order), its manifest
    excepted: the manifest holds timings that differ between runs of identical content. Hidden entries (trainer
    scratch, temp folders) are not content."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        rel = f.name if f == path else f.relative_to(path).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in Path(rel).parts):
            continue
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def stored_params(folder: str | Path) -> int:
    """Parameters stored in a model folder's safetensors, read from their headers (no weights loaded). For a
    bitsandbytes checkpoint this counts packed elements, not the model's parameters."""
    import math
    import struct

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total
