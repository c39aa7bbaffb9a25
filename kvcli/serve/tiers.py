"""The machine's storage tiers for `kvcli serve`: capacities and measured bandwidths.

The cache manager (kvcli.serve.manager) only does bookkeeping over `Tier`s; this module
looks at the machine to build them: free GPU memory and RAM, free disk under the store,
the disk's read bandwidth and the host-to-GPU copy bandwidth.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

from kvcli.serve.manager import Tier


def disk_read_bandwidth(directory: str | os.PathLike, nbytes: int = 16 << 20) -> float:
    """Bytes/s reading a fresh file in `directory` (page cache dropped where the OS allows)."""
    os.makedirs(directory, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".bandwidth-", dir=directory)
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while f.read(4 << 20):
                pass
            seconds = time.perf_counter() - start
    finally:
        os.unlink(path)
    return nbytes / max(seconds, 1e-6)


def host_to_device_bandwidth(nbytes: int = 64 << 20) -> float:
    """Bytes/s copying pinned host memory to the GPU (inf without one: nothing to copy)."""
    import torch

    if not torch.cuda.is_available():
        return math.inf
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)  # warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - start)


def default_capacities(store: str | os.PathLike) -> dict[str, int]:
    """Sensible defaults from the machine: 30% of free GPU memory, 25% of available RAM,
    the smaller of 20 GiB and half of the free disk under the store."""
    import torch

    capacities = {}
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        capacities["gpu"] = int(free * 0.3)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    capacities["cpu"] = int(available * 0.25)
    os.makedirs(store, exist_ok=True)
    capacities["disk"] = int(min(20 << 30, shutil.disk_usage(store).free * 0.5))
    return capacities


def machine_tiers(store: str | os.PathLike, capacities: dict[str, int | None]) -> list[Tier]:
    """gpu (if CUDA), cpu and disk tiers with measured bandwidths; None capacities get defaults."""
    import torch

    defaults = default_capacities(store)
    chosen = {name: capacities.get(name) if capacities.get(name) is not None else defaults[name] for name in defaults}
    disk = disk_read_bandwidth(store)
    tiers = []
    if torch.cuda.is_available():
        host = host_to_device_bandwidth()
        tiers.append(Tier("gpu", chosen["gpu"], math.inf))
        tiers.append(Tier("cpu", chosen["cpu"], host))
        disk = 1.0 / (1.0 / disk + 1.0 / host)  # read, then copy to the GPU
    else:
        tiers.append(Tier("cpu", chosen["cpu"], math.inf))
    tiers.append(Tier("disk", chosen["disk"], disk, encoded=True))
    return tiers
