"""The `kvcli serve` command: load the model once, manage caches across tiers, answer over HTTP."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Optional

import typer

from kvcli.serve.manager import DEFAULT_ALPHA, POLICIES

IDLE_CHECK_SECONDS = 10.0  # how often the idle profiler looks for work


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(flag: str, text: str | None) -> int | None:
    """'4G', '512M', '1.5GiB', '1000' -> bytes (binary units); None stays None (machine default)."""
    from kvcli.errors import KvcliError

    if text is None:
        return None
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise KvcliError(f"{flag} {text!r}: give a size such as 4G, 512M or 1000000") from None
    if number < 0:
        raise KvcliError(f"{flag} must be >= 0")
    return int(number * _UNITS[unit])


def _claim_store(store):
    """Lock the cache store for this server: two servers on one store would delete each other's files.

    The lock file is opened without following links and never truncated: a link planted at
    its name (a shared cache folder) is refused instead of clobbering what it points to.
    """
    import fcntl
    import os
    import stat

    from kvcli.errors import KvcliError

    store.mkdir(parents=True, exist_ok=True)
    path = store / ".serve.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), 0o600)
    except OSError as exc:
        reason = "it is a symbolic link" if os.path.islink(path) else (exc.strerror or str(exc))
        raise KvcliError(f"cannot open the store's lock file {path}: {reason}") from None
    handle = os.fdopen(fd, "r+b")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise KvcliError(f"the store's lock file {path} is not a regular file")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise KvcliError(f"another `kvcli serve` is using the cache store {store}; stop it or set KVCLI_CACHE_DIR") from None
    return handle


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _route_uvicorn_logs(log) -> None:
    """uvicorn logs through `logging`: its lines go to `log` (-v), else nowhere (every error a
    client sees is already its JSON reply; ours go through `log` and the warnings list)."""
    import logging

    class Forward(logging.Handler):
        def emit(self, record):
            if log is not None:
                log(f"uvicorn: {record.getMessage()}")

    logger = logging.getLogger("uvicorn")
    logger.handlers[:] = [Forward()]
    logger.setLevel(logging.INFO if log is not None else logging.CRITICAL + 1)
    logger.propagate = False


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        *,
        host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback only unless --allow-remote).")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 8765,
        socket_path: Annotated[Optional[str], typer.Option("--socket", help="Listen on this Unix socket instead of TCP (mode 0600).")] = None,
        gpu_bytes: Annotated[Optional[str], typer.Option("--gpu-bytes", help="GPU tier capacity, e.g. 4G or 512M (default: 30% of free GPU memory).")] = None,
        cpu_bytes: Annotated[Optional[str], typer.Option("--cpu-bytes", help="CPU tier capacity, e.g. 8G (default: 25% of available RAM).")] = None,
        disk_bytes: Annotated[Optional[str], typer.Option("--disk-bytes", help="Disk tier capacity, e.g. 50G (default: min(20 GiB, half the free disk)).")] = None,
        alpha: Annotated[float, typer.Option("--alpha", help="Quality given up per second of time to first token (joint policy weight).")] = DEFAULT_ALPHA,
        policy: Annotated[str, typer.Option("--policy", help=f"Placement policy: {', '.join(POLICIES)} (joint: compression and tier chosen together; lru: every cache at --ratio, least recently used demoted, LMCache-style; compress-only: the joint compression, no slower tiers).")] = "joint",
        ratio: Annotated[float, typer.Option("--ratio", help="Kept ratio of every cache under --policy lru (1: full caches).")] = 1.0,
        model: Annotated[str, typer.Option("--model", "-m", envvar="KVCLI_MODEL", help="Model spec, as for `kvcli ask`.")] = "default",
        device: Annotated[str, typer.Option("--device", envvar="KVCLI_DEVICE", help="auto, cpu or cuda.")] = "auto",
        allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host and any Host header (requests still need the token; it travels unencrypted).")] = False,
        max_pending: Annotated[int, typer.Option("--max-pending", help="Requests waiting or running before new ones get 503.")] = 8,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request and placement decision on stderr.")] = False,
    ) -> None:
        """Keep the model loaded and serve ask/compress/cache over a local JSON API."""
        from kvcli.cli.common import guard, stderr

        def run():
            from kvcli.errors import KvcliError
            from kvcli.serve.manager import make_manager
            from kvcli.serve.tiers import machine_tiers
            from kvcli.models import load_model
            from kvcli.store.persist import store_dir
            from kvcli.serve.server import check_loopback, check_socket_path, make_server, server_url
            from kvcli.serve.service import ModelService

            if max_pending < 1:
                raise KvcliError("--max-pending must be at least 1")
            if alpha < 0:
                raise KvcliError("--alpha must be >= 0")
            if policy not in POLICIES:
                raise KvcliError(f"--policy {policy!r}: choose from {', '.join(POLICIES)}")
            if not 0.0 < ratio <= 1.0:
                raise KvcliError("--ratio must be in (0, 1]")
            capacities = {
                "gpu": parse_size("--gpu-bytes", gpu_bytes), "cpu": parse_size("--cpu-bytes", cpu_bytes), "disk": parse_size("--disk-bytes", disk_bytes),
            }
            if socket_path is not None:
                check_socket_path(socket_path)  # before the model load: a bad path fails fast
            elif not allow_remote:
                check_loopback(host)  # likewise a refused address
            claim = _claim_store(store_dir())  # held until we stop (or the process dies)
            log = (lambda line: stderr.print(line, markup=False, highlight=False)) if verbose else None
            _route_uvicorn_logs(log)
            stderr.print(f"loading model {model} ...")
            loaded = load_model(model, device=device)
            tiers = machine_tiers(store_dir(), capacities)
            manager = make_manager(
                policy, tiers, ModelService.shape_of(loaded), ratio=ratio, alpha=alpha, on_decision=(lambda d: log(d.describe())) if log else None
            )
            # lru keeps one configuration whatever its quality: profiling would only cost model time
            service = ModelService(loaded, manager, max_pending=max_pending, profile=policy != "lru")
            adopted = service.rediscover()
            for warning in service.warnings:
                stderr.print(f"warning: {warning}", markup=False)
            server = make_server(service, host=host, port=port, socket_path=socket_path, allow_remote=allow_remote, log=log)
            stop = threading.Event()

            def idle_profiler():
                while not stop.wait(IDLE_CHECK_SECONDS):
                    try:
                        profiled = service.profile_idle()
                    except Exception as exc:  # a failed profile must not stop serving
                        stderr.print(f"idle profiling failed: {exc}", markup=False)
                        continue
                    if profiled and log:
                        log(f"profiled {profiled[:12]} while idle")

            threading.Thread(target=idle_profiler, daemon=True).start()
            for tier in tiers:
                stderr.print(f"tier {tier.name}: {tier.capacity / 1e9:.2f} GB, {tier.bandwidth / 1e9:.2f} GB/s", markup=False)
            if server.token_file is not None:
                stderr.print(f"token for clients: {server.token_file} (kvcli --server reads it; others send `Authorization: Bearer <its content>`)", markup=False)
            stderr.print(f"placement policy {policy}" + (f", every cache {manager.configs[0].name}" if policy == "lru" else ""), markup=False)
            stderr.print(f"{adopted} cached document(s) found on disk; serving {loaded.name} on {server_url(server)} (Ctrl-C stops)", markup=False)
            signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
            try:
                server.serve_forever()
            finally:
                stop.set()
                server.server_close()
                stderr.print("stopping: writing caches held in memory to the disk tier ...", markup=False)
                stderr.print(f"{service.stop()} cached document(s) on disk", markup=False)
                claim.close()

        guard(run)
