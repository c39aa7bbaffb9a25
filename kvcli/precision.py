"""Which floating-point precision each phase runs in: reading (prefill) and decoding.

The two phases want different things on a CPU. Reading is matrix-matrix work over
thousands of tokens: with AMX or AVX-512 BF16, bfloat16 runs it about 3x faster than
float32 (4,096 tokens of the embedded model, 2 threads: 2.48 s against 7.58 s). Decoding
is matrix-vector work, one token at a time, and there float32 is the faster one
(51 ms/token against 182 ms/token bfloat16). So `auto` reads in bfloat16 where the CPU has
native bf16 instructions and decodes in float32; a GPU does both in bfloat16; any named
precision forces both phases (weights, activations and cache in that dtype).

`auto`'s bfloat16 reading on a CPU is autocast: the weights stay float32 (the exact
dequantized ones decoding uses), every matmul and attention runs in bfloat16, and the
residual stream, the norms and the K/V cache stay float32. Against casting the weights
(a bfloat16 model, bfloat16 hidden states) it keeps more of float32's predictions (document
teacher-forced top-1 98.2% against 97.1% on field_notes.txt) at a few percent of the speed,
needs no second copy of the weights, and leaves the cache (and a .kvc file) in float32.

Deliberately torch-free: `--dtype` is checked before torch is imported, so a bad value is
a one-line error that costs no start-up time.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcli.errors import KvcliError

AUTO = "auto"
NAMES = ("float32", "bfloat16", "float16")
CHOICES = (AUTO, *NAMES)
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# CPU flags (as /proc/cpuinfo spells them) under which bf16 matmuls run natively.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class Precision:
    read: str  # one of NAMES: the matmuls and attention of the prefill
    decode: str  # one of NAMES: decoding, and what a loaded .kvc cache is cast to
    why: str  # one line, for `kvcli info` and --json
    # Reading under autocast (weights, residual stream and cache stay `decode`); else the
    # weights themselves are cast to `read` for reading.
    autocast: bool = False

    def describe(self) -> dict:
        return {"read": self.read, "decode": self.decode, "read_autocast": self.autocast, "why": self.why}

    @property
    def reading(self) -> str:
        """How documents are read, in one word or two: "float32", "bfloat16 autocast". What a
        stored cache's content depends on (the reuse store keys it, .kvc headers record it);
        the decoding precision does not change what is stored."""
        return f"{self.read} autocast" if self.autocast else self.read


def parse(value: str | None) -> str:
    """A --dtype / KVCLI_DTYPE value -> "auto" or one of NAMES (KvcliError if neither).
    Empty (KVCLI_DTYPE= ) means auto; fp32/bf16/fp16 are accepted for the names."""
    name = (value or "").strip().lower() or AUTO
    name = _ALIASES.get(name, name)
    if name not in CHOICES:
        raise KvcliError(f"unknown --dtype {value!r}: use {', '.join(CHOICES)}")
    return name


def choose(requested: str, device_type: str, cpu_flags: frozenset[str] | set[str] = frozenset()) -> Precision:
    """The precision of each phase for `requested` ("auto" or a name) on `device_type`.

    cpu_flags: the CPU's feature flags (see `cpu_flags()`); only consulted for auto on CPU.
    """
    requested = parse(requested)
    if requested != AUTO:
        return Precision(requested, requested, f"--dtype {requested}")
    if device_type == "cuda":
        return Precision("bfloat16", "bfloat16", "GPU: bfloat16 halves memory and bandwidth")
    if device_type == "cpu" and BF16_FLAGS & set(cpu_flags):
        native = ", ".join(sorted(BF16_FLAGS & set(cpu_flags)))
        return Precision(
            "bfloat16", "float32", f"CPU with {native}: bfloat16 (autocast) reading is faster, float32 decoding is faster", autocast=True
        )
    return Precision("float32", "float32", f"{device_type.upper()} without native bfloat16: float32")


def cpu_flags() -> frozenset[str]:
    """This CPU's bf16-relevant features: what torch reports, else /proc/cpuinfo's flags."""
    flags: set[str] = set()
    try:
        import torch.cpu

        if torch.cpu._is_amx_tile_supported():  # private, but it also checks the OS enables AMX
            flags.add("amx_bf16")
        if torch.cpu._is_avx512_bf16_supported():
            flags.add("avx512_bf16")
        return frozenset(flags)
    except (ImportError, AttributeError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")
