"""The server's access token: created at start, readable only by the user who started it.

`kvcli serve` on TCP writes a random token to `token_path(port)`, a 0600 file in a 0700
folder under the user's runtime directory ($XDG_RUNTIME_DIR/kvcli) or, without one, under
kvcli's cache folder; every TCP request must carry it (`Authorization: Bearer TOKEN`).
Other local users cannot read it, so they cannot use the server. `--server` clients of the
same user read it from the same place (or from $KVCLI_SERVER_TOKEN, e.g. on another
machine with --allow-remote). A Unix socket needs no token: the socket itself is 0600.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from kvcli.errors import KvcliError

TOKEN_ENV = "KVCLI_SERVER_TOKEN"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def token_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "kvcli"
    from kvcli.models import cache_dir

    return cache_dir() / "run"


def token_path(port: int) -> Path:
    return token_dir() / f"server-{int(port)}.token"


def _private_dir(folder: Path) -> None:
    """The folder exists, is ours and nobody else may write (or list) it."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise KvcliError(f"cannot create {folder} for the server's token: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise KvcliError(f"{folder} is not a folder owned by you: the server's token cannot be kept there safely")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)


def create_token(port: int) -> tuple[str, Path]:
    """A fresh random token written (atomically, mode 0600, no links followed) for `port`."""
    path = token_path(port)
    _private_dir(path.parent)
    token = secrets.token_urlsafe(32)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise KvcliError(f"cannot write the server's token {path}: {exc.strerror or exc}") from None
    return token, path


def remove_token(path: Path, token: str) -> None:
    """Delete the token file if it is still ours (a newer server on the port may have replaced it)."""
    if read_token_file(path) == token:
        path.unlink(missing_ok=True)


def read_token_file(path: Path) -> str | None:
    """The token in `path`, if it is a regular file of ours that only we can read; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            return None
        return handle.read(256).strip() or None


def client_token(port: int) -> str | None:
    """What a client sends to the server on `port`: $KVCLI_SERVER_TOKEN, else the token file."""
    return os.environ.get(TOKEN_ENV) or read_token_file(token_path(port))
