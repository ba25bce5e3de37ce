"""Where a model's files are and which base an adapter was trained on: the rules preflight and the model share.

- ``looks_local`` / ``local_model_dir``: a path is local when it starts with ``.``, ``/`` or ``~``, has more
  than one ``/`` or exists; a hub id is read from the local Hugging Face cache, never downloaded.
- ``fingerprint``: a short hash of a checkpoint's config and weights.
- ``base_record`` / ``write_base_record``: beside every adapter, the base it was trained on (``BASE_RECORD``).
- ``check_same_base``: a reward adapter scores only on the base it was trained on (same fingerprint; the same
  name where one side has no weights here).

Standard library only: preflight runs these checks before torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from marl_exp.errors import ConfigError
from marl_exp.io import atomic_write_json

log = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"  # model.path=builtin:tiny | builtin:smollm2, built on first use
BASE_RECORD = "marl_exp_base.json"
_FULL_HASH_LIMIT = 64 * 2**20  # hash whole files up to this size, sample bigger ones
_SAMPLE_CHUNKS, _CHUNK = 64, 2**16


class BaseMismatchError(ConfigError):
    """The reward adapter was trained on a different base than the one it would score on."""


# ------------------------------------------------------------------------------------ where files are
def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (hub ids look like ``org/name`` or ``name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(os.path.expanduser(path))


def model_cache_root() -> Path:
    """Where built-in models (``builtin:<name>``) are built: ``$MARL_EXP_CACHE``, else ``~/.cache/marl-exp``."""
    return Path(os.environ.get("MARL_EXP_CACHE", Path.home() / ".cache" / "marl-exp")).expanduser()


def hub_cache_dir() -> Path:
    """huggingface_hub's cache dir, resolved as it does (not imported here: its constants freeze the offline
    flag at import, and preflight may still set it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache / "huggingface" / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path | None:
    """The local snapshot of a hub repo in the HF cache, or None."""
    repo = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is not None and snapshot.is_dir():
        return snapshot
    snapshots = sorted((repo / "snapshots").glob("*")) if revision is None else []
    return snapshots[-1] if snapshots else None


def local_model_dir(path: str, model_cfg=None) -> Path | None:
    """A local directory, or the cached snapshot of a hub id at ``model_cfg.revision`` (None when neither is here)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    revision = getattr(model_cfg, "revision", None) if model_cfg is not None else None
    return None if looks_local(path) else cached_snapshot(path, "model", revision)


# ------------------------------------------------------------------------------------ which base
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


def base_record(base_path: str, base_name: str, base_dir: Path | None) -> dict:
    """Which base an adapter was trained on: path or hub id, preset name, weight fingerprint."""
    return {"base_model": base_path, "base_model_name": base_name,
            "fingerprint": fingerprint(base_dir) if base_dir is not None else None}


def write_base_record(adapter_dir: Path, base_path: str, base_name: str, base_dir: Path | None) -> dict:
    """Record in an adapter dir which base it was trained on (read back by ``check_same_base``)."""
    record = base_record(base_path, base_name, base_dir)
    atomic_write_json(Path(adapter_dir) / BASE_RECORD, record)
    return record


def reward_base_record(reward_adapter: str) -> dict | None:
    """The base record beside an adapter (None for adapters from elsewhere)."""
    path = Path(reward_adapter).expanduser() / BASE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def check_same_base(reward_adapter: str, base_path: str | None, allow_mismatch: bool,
                    key: str = "stage.reward_adapter") -> None:
    """Refuse a reward adapter trained on another base than ``base_path`` (it would score nonsense without an
    error): ``BaseMismatchError`` naming ``key``, or a warning when ``allow_mismatch``.

    Fingerprints decide; where one side has no weights here (a hub base not in the local cache) the recorded
    name must match. Adapters without a record are not checked.
    """
    record = reward_base_record(reward_adapter)
    if record is None or base_path is None:
        return
    base_path = str(base_path)
    base_dir = local_model_dir(base_path)
    ours = fingerprint(base_dir) if base_dir is not None and (base_dir / "config.json").is_file() else None
    theirs = record.get("fingerprint")
    same = ours == theirs if ours is not None and theirs is not None else str(record.get("base_model")) == base_path
    if same:
        return
    message = (f"{key}={reward_adapter!r} was trained on base {record.get('base_model')!r} (fingerprint {theirs}), "
               f"but this run's SFT model is {base_path!r} (fingerprint {ours}); use the reward adapter's base as "
               "stage.sft_model (or none, to build both), or set stage.allow_base_mismatch=true "
               "(allow_base_mismatch=True in Python) if you know why")
    if not allow_mismatch:
        raise BaseMismatchError(message)
    log.warning("%s (allowed by allow_base_mismatch)", message)
