"""Atomic writes in shared or hostile directories (issue 14 items 7 and 9): modes kept on
replace, temp files never opened through a link, stale temp files of killed writers swept."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from kvcli.errors import KvcliError
from kvcli.store import kvcfile
from kvcli.store.kvcfile import atomic_write, save_cache, sweep_stale_temps
from tests.support import make_cache, make_header


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replace_keeps_the_mode(tmp_path, umask_022):
    """A 0600 file used to come back 0644 after an atomic replace."""
    path = tmp_path / "c.kvc"
    path.write_bytes(b"old")
    path.chmod(0o600)
    save_cache(path, make_cache(), make_header())
    assert mode_of(path) == 0o600
    path.chmod(0o640)
    atomic_write(path, b"new")
    assert mode_of(path) == 0o640 and path.read_bytes() == b"new"


def test_new_file_mode(tmp_path, umask_022):
    atomic_write(tmp_path / "default.txt", b"x")
    assert mode_of(tmp_path / "default.txt") == 0o644  # the user's umask default, as open() gives
    atomic_write(tmp_path / "private.txt", b"x", mode=0o600)
    assert mode_of(tmp_path / "private.txt") == 0o600
    os.umask(0o077)
    atomic_write(tmp_path / "strict.txt", b"x")
    assert mode_of(tmp_path / "strict.txt") == 0o600


def test_temp_file_is_private_while_written(tmp_path, monkeypatch, umask_022):
    """The half-written temp file of a file that ends up 0600 is never readable by others."""
    seen = []
    real = kvcfile._write_chunks

    def spy(fileobj, data):
        seen.append(stat.S_IMODE(os.fstat(fileobj.fileno()).st_mode))
        real(fileobj, data)

    monkeypatch.setattr(kvcfile, "_write_chunks", spy)
    atomic_write(tmp_path / "p.txt", b"secret", mode=0o600)
    assert seen == [0o600]


def test_temp_file_is_opened_exclusively_without_following_links(tmp_path, monkeypatch):
    """A link planted at the temp name (in a shared directory) is never written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    monkeypatch.setattr(kvcfile.secrets, "token_hex", lambda n: "ab" * n)
    target = tmp_path / "c.kvc"
    planted = tmp_path / f".c.kvc.tmp-{os.getpid()}-{'ab' * 6}"
    planted.symlink_to(victim)
    flags = []
    real_open = os.open
    monkeypatch.setattr(kvcfile.os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    with pytest.raises(KvcliError, match=f"^cannot write {target}"):
        atomic_write(target, b"data")
    assert victim.read_bytes() == b"precious" and not target.exists()
    assert flags[0] & os.O_EXCL and flags[0] & os.O_NOFOLLOW and flags[0] & os.O_CREAT


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    target = tmp_path / "c.kvc"
    target.symlink_to(victim)
    atomic_write(target, b"data")
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"data"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_swept_by_the_next_write(tmp_path):
    """kill -9 of a CLI write used to leave its .X.kvc.tmp-PID-* (tens of MB) forever."""
    gone = dead_pid()
    old = time.time() - 3600
    stale = tmp_path / f".c.kvc.tmp-{gone}-0123456789ab"
    recent = tmp_path / f".d.kvc.tmp-{gone}-0123456789ab"  # may be a writer on another host
    alive = tmp_path / f".e.kvc.tmp-{os.getpid()}-0123456789ab"
    lookalike = tmp_path / f".notes.tmp-{gone}"  # not our name pattern: not ours to delete
    for path in (stale, recent, alive, lookalike):
        path.write_bytes(b"half a cache")
    for path in (stale, alive, lookalike):
        os.utime(path, (old, old))
    save_cache(tmp_path / "other.kvc", make_cache(), make_header())
    assert not stale.exists()
    assert recent.exists() and alive.exists() and lookalike.exists()
    assert sweep_stale_temps(tmp_path, older_than=-1) == [recent.name]
