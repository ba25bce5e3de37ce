"""A short hash of a checkpoint, to tell two bases apart cheaply (standard library only: the CLI compares
bases before torch is imported)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_FULL_HASH_LIMIT = 64 * 2**20  # hash whole files up to this size, sample bigger ones
_SAMPLE_CHUNKS, _CHUNK = 64, 2**16


def fingerprint(model_dir: str | Path) -> str:
    """A short hash of a checkpoint's config and weight files, to tell two bases apart cheaply.

    Small files are hashed whole; big ones by size plus evenly spaced chunks (a 7B model in ~1 s).
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    weight_files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for file in weight_files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            if size <= _FULL_HASH_LIMIT:
                digest.update(handle.read())
                continue
            for i in range(_SAMPLE_CHUNKS):
                handle.seek(i * (size - _CHUNK) // (_SAMPLE_CHUNKS - 1))
                digest.update(handle.read(_CHUNK))
    return digest.hexdigest()[:16]
