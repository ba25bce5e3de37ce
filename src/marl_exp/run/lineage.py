"""W&B lineage: every stage logs its output as a ``model`` artifact and declares the artifacts it used.

    sft-<hash>  (SFT model)  →  reward-<hash>  (reward adapter)  →  ppo-<hash>-<policy>  (policy adapter)

``<hash>`` is ``config_hash`` (``marl_exp.config.stage_graph``) of the run that produced the output, so a cached upstream entry
``cache/sft-<hash>/`` and its artifact share a name. The metadata says what the output is: base model and
fingerprint, LoRA r and alpha, quantization, key metrics (see ``output_metadata``).

Offline runs keep the lineage for ``wandb sync``. wandb 0.31 refuses ``run.use_artifact`` offline (it
resolves names on the server), but artifacts are content-addressed: an artifact's digest hashes the path
and MD5 of each file, whether the file is uploaded or referenced. So a downstream run rebuilds the
artifact from the files it reads, with the upstream's name, type and metadata (from ``RECORD``, written
beside the output when it was logged), and records it the way online ``use_artifact(<artifact object>)``
does: as an artifact with ``use_after_commit``. On sync, W&B's artifact saver creates the artifact, gets
back the version with that digest, the one the upstream run logged, and marks it used by this run. Cached
outputs that are reused, not rerun, are declared the same way.

Files (``logger.artifacts``): ``auto`` uploads files up to ``logger.artifact_max_upload_mb`` (adapters,
tokenizers, small models) and references bigger ones as ``file://`` URIs with their MD5 (W&B stores path and
checksum, the weights stay on disk); ``upload`` and ``reference`` treat every file one way; ``none`` logs no
artifacts. The digest, and so the lineage, is the same in every mode. Nothing happens without a W&B run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from marl_exp.config import INPUT_KEY, OUTPUT_SUBDIR, RL_STAGES, config_hash, sft_finetune_mode
from marl_exp.io import atomic_write_json
from marl_exp.provenance import BASE_RECORD, base_record, fingerprint, local_model_dir
from marl_exp.run.tracking import Tracker

log = logging.getLogger(__name__)
ARTIFACT_TYPE = "model"
RECORD = "marl_exp_artifact.json"  # in the output dir: name, metadata, digest and file hashes of its artifact
INPUT_STAGES = {key: stage for stage, key in INPUT_KEY.items()}  # run_stage inputs → the stage that made them


def log_outputs(tracker: Tracker, cfg: DictConfig, run_dir: Path, summary: dict, publish_dir: Path) -> None:
    """Log this run's output(s) as artifacts. ``publish_dir`` is where ``run_dir`` ends up (a cache entry
    is built beside it and renamed): references point there."""
    if not tracker.logs_artifacts:
        return
    stage = cfg.stage.name
    name = f"{stage}-{config_hash(cfg)}"
    output = Path(run_dir) / OUTPUT_SUBDIR[stage]
    if not output.is_dir():
        log.warning("no %s output in %s; no W&B artifact logged", stage, run_dir)
        return
    # PPO: one artifact per saved adapter (policies/<name>/, critics too).
    outputs = sorted(p for p in output.iterdir() if p.is_dir()) if stage in RL_STAGES else [output]
    for directory in outputs:
        artifact_name = f"{name}-{directory.name}" if stage in RL_STAGES else name
        published = Path(publish_dir) / directory.relative_to(run_dir)
        try:
            metadata = output_metadata(cfg, directory, summary, published)
            artifact, files = build_artifact(artifact_name, metadata, directory, published,
                                             upload=_upload_rule(tracker))
            tracker.log_artifact(artifact)
            atomic_write_json(directory / RECORD, {"name": artifact.name, "type": ARTIFACT_TYPE,
                                                   "metadata": metadata, "digest": artifact.digest, "files": files})
            log.info("logged %s as W&B artifact %s (digest %s)", published, artifact.name, artifact.digest)
        except Exception as err:  # noqa: BLE001 - a logger problem never stops training
            log.warning("could not log %s as a W&B artifact: %s: %s", directory, type(err).__name__, err)


def use_inputs(tracker: Tracker, cfg: DictConfig, inputs: dict[str, str]) -> None:
    """Declare the upstream outputs this run reads (given, freshly built or reused from the cache)."""
    if not tracker.logs_artifacts:
        return
    for key, path in inputs.items():
        directory = local_model_dir(path, cfg.model)
        if directory is None:  # a hub id that is not in the local cache: no files to hash
            log.info("W&B lineage: %s=%s is not a local directory; not declared as an artifact", key, path)
            continue
        try:
            artifact = input_artifact(path, Path(directory), INPUT_STAGES[key], upload=_upload_rule(tracker))
            tracker.use_artifact(artifact)
            log.info("declared %s as used W&B artifact %s (digest %s)", directory, artifact.name, artifact.digest)
        except Exception as err:  # noqa: BLE001 - a logger problem never stops training
            log.warning("could not declare %s as a used W&B artifact: %s: %s", directory, type(err).__name__, err)


def input_artifact(path: str, directory: Path, stage: str, upload) -> Any:
    """The artifact an upstream output was logged as, rebuilt from its files in ``directory``: same name,
    type and metadata and, if no file changed since, the same digest. An output logged without W&B gets
    the name it would have had (a cache entry's) or one from its path."""
    record = json.loads((directory / RECORD).read_text()) if (directory / RECORD).exists() else None
    if record is None:
        artifact, _ = build_artifact(default_input_name(path, directory, stage), input_metadata(directory, stage),
                                     directory, directory, upload=upload, stage_copies=False)
        return artifact
    files = record["files"]

    def as_logged(rel: str, size: int) -> bool:
        # Each file uploaded or referenced as the upstream run did: the same manifest, whichever of the
        # two runs `wandb sync` uploads first.
        return files[rel]["uploaded"] if rel in files else upload(rel, size)

    artifact, _ = build_artifact(record["name"], record["metadata"], directory, directory, upload=as_logged,
                                 known=files, stage_copies=False)
    if artifact.digest != record["digest"]:
        log.warning("%s changed since it was logged as %s (digest %s, now %s); W&B will record a new version",
                    directory, record["name"], record["digest"], artifact.digest)
    return artifact


def build_artifact(name: str, metadata: dict, directory: Path, published: Path, upload, known: dict | None = None,
                   stage_copies: bool = True):
    """A ``model`` artifact of every file under ``directory`` (not ``RECORD``) and a per-file record
    (size, mtime, MD5, uploaded). ``upload(rel, size)`` decides upload or ``file://`` reference (under
    ``published``); MD5s in ``known`` are reused for files whose size and mtime are unchanged. Files to
    upload are copied to wandb's staging dir (they may move, a cache entry is renamed) unless
    ``stage_copies`` is false: inputs stay where they are, and are usually uploaded already."""
    import wandb
    from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

    known = known or {}
    artifact = wandb.Artifact(_safe_name(name), type=ARTIFACT_TYPE, metadata=metadata)
    files = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != RECORD):
        rel = path.relative_to(directory).as_posix()
        stat = path.stat()
        uploaded = bool(upload(rel, stat.st_size))
        if uploaded:  # wandb hashes the file (and stages a copy for the upload)
            md5 = artifact.add_file(str(path), name=rel, policy="mutable" if stage_copies else "immutable").digest
        else:  # what add_reference("file://...", checksum=True) adds, pointing at the published path
            old = known.get(rel)
            same = old is not None and (old["size"], old["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
            md5 = old["md5"] if same else _md5_b64(path)
            artifact.manifest.add_entry(ArtifactManifestEntry(
                path=rel, ref=(Path(published) / rel).resolve().as_uri(), digest=md5, size=stat.st_size))
        files[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": md5, "uploaded": uploaded}
    return artifact, files


def output_metadata(cfg: DictConfig, directory: Path, summary: dict, published: Path) -> dict:
    """What an output is: base model + fingerprint, LoRA r/alpha, quantization, key metrics, where it is."""
    from marl_exp.modeling.loading import resolve_model_path  # imports torch: only to log an SFT model

    stage = cfg.stage.name
    metadata: dict[str, Any] = {"stage": stage, "model": cfg.model.name, "path": str(published),
                                "config_hash": config_hash(cfg), "seed": cfg.seed}
    if stage == "sft":
        base = resolve_model_path(cfg.model)
        metadata.update(base_record(base, cfg.model.name, local_model_dir(base, cfg.model)))
        metadata["model_fingerprint"] = fingerprint(directory)  # what reward and PPO record as their base
        metadata["finetune"] = sft_finetune_mode(cfg)
        lora = metadata["finetune"] == "lora"
    else:  # adapters record the base they were trained on beside them
        metadata.update(json.loads((directory / BASE_RECORD).read_text()))
        lora = True
    if lora:
        metadata.update(r=cfg.adapter.r, lora_alpha=cfg.adapter.lora_alpha, lora_dropout=cfg.adapter.lora_dropout,
                        target_modules=list(cfg.adapter.target_modules))
    metadata["quant"] = cfg.quant.mode
    if cfg.quant.mode == "4bit":
        metadata.update(bnb_4bit_quant_type=cfg.quant.bnb_4bit_quant_type,
                        bnb_4bit_use_double_quant=cfg.quant.bnb_4bit_use_double_quant,
                        bnb_4bit_compute_dtype=cfg.quant.bnb_4bit_compute_dtype)
    policies = list(cfg.stage.policies) if stage in RL_STAGES else []
    metadata["metrics"] = key_metrics(summary, directory.name if len(policies) > 1 else None)
    return metadata


def key_metrics(summary: dict, policy: str | None = None) -> dict:
    """Finite ``eval/*`` metrics and ``train/steps``; with several PPO policies, ``policy``'s own
    ``eval/<tag>/<policy>/<metric>`` keys, without the policy segment."""
    metrics = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        parts = key.split("/")
        if key == "train/steps" or (parts[0] == "eval" and policy is None):
            metrics[key] = value
        elif parts[0] == "eval" and len(parts) == 4 and parts[2] == policy:
            metrics["/".join(parts[:2] + parts[3:])] = value
    return metrics


def input_metadata(directory: Path, stage: str) -> dict:
    """Metadata of an input logged without W&B: where it is and, for adapters, the base it records."""
    metadata: dict[str, Any] = {"stage": stage, "path": str(directory.resolve())}
    if (directory / BASE_RECORD).exists():
        metadata.update(json.loads((directory / BASE_RECORD).read_text()))
    return metadata


def default_input_name(path: str, directory: Path, stage: str) -> str:
    """``<stage>-<hash>`` for a cache entry (the name W&B would have logged it under), else from the path:
    ``<stage>-<parent dir>-<dir>`` for a local dir, ``<stage>-<hub id>`` for a hub model."""
    if not Path(path).is_dir():
        return _safe_name(f"{stage}-{path}")
    entry = directory.resolve().parent.name
    if re.fullmatch(rf"{stage}-[0-9a-f]{{12}}", entry):
        return entry
    return _safe_name(f"{stage}-{entry}-{directory.name}")


def _upload_rule(tracker: Tracker):
    limit = tracker.artifact_max_upload_mb * 2**20
    return {"upload": lambda rel, size: True, "reference": lambda rel, size: False,
            "auto": lambda rel, size: size <= limit}[tracker.artifacts]


def _safe_name(name: str) -> str:
    """W&B artifact names take letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "artifact"


def _md5_b64(path: Path) -> str:
    """The file's MD5 as W&B's manifests write it (base64)."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**24), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()
