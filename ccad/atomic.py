"""Writing a folder (or one file) so that a refused, failed or killed write never leaves it half
done: the one writer every model folder goes through (``save_pretrained``, ``ccad bank``, the end
of ``ccad train``, ``ccad calibrate``, ``ccad evaluate --record``, ``ccad pull``, the app's save).

:func:`replace_folder` hands out a fresh temporary sibling of the destination; only when the
caller's ``with`` block has finished writing into it is it swapped in:

- the destination does not exist: the temporary folder is renamed to it;
- the destination is a model folder (it holds ``config.json``): the two folders are exchanged in
  one ``renameat2(RENAME_EXCHANGE)`` call where the kernel offers it (else: the old folder is
  renamed aside, the new one renamed in, the old one put back if that fails); entries of the old
  folder that are no model file (a user's notes, ``checkpoint-*`` folders) are moved over, and
  the old folder is removed;
- the destination is some other folder (empty, or a run folder, or a folder of the user's): its
  entries stay, the new files are moved in one by one (a same-named entry is replaced,
  ``config.json`` last); so is a model folder that is the working directory (or holds it), whose
  old model files are removed afterwards.

An exception inside the ``with`` block (a refused calibration, a full disk, a failed download)
removes the temporary folder and leaves the destination as it was, byte for byte. A temporary
or set-aside sibling left by a killed process (its pid is gone) is cleaned up by the next write:
a set-aside old folder whose destination is missing is put back.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["FolderBusyError", "folder_lock", "replace_folder", "write_bytes_atomic", "write_text_atomic"]

_TMP = ".{name}.saving-{pid}-{tag}"
_OLD = ".{name}.old-{pid}-{tag}"
# the files and folders a saved detector is made of (ccad.detector_folder, the methods' save hooks)
_MODEL_FILES = {"config.json", "calibration.json", "info.json", "README.md", "bank.json", "bank.safetensors"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _cleanup_leftovers(dest: Path) -> None:
    """Remove the temporary siblings of ``dest`` left by a killed writer; put a set-aside old
    folder back when the destination itself is missing (killed between the two renames)."""
    pat = re.compile(r"^\." + re.escape(dest.name) + r"\.(saving|old)-(\d+)-[0-9a-f]+$")
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        m = pat.match(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not dest.exists():
            with contextlib.suppress(OSError):
                os.rename(p, dest)
                continue
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    """Flush every file (and folder) under ``folder`` to disk before it is swapped in."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_model_entry(p: Path) -> bool:
    """True for a file or folder that belongs to a saved model (and is replaced with it): the
    detector's own files, any top-level ``*.safetensors`` / ``*.json``, and a component folder
    (one holding ``config.json`` or ``*.safetensors``), never a ``checkpoint-*`` folder."""
    if p.name in _MODEL_FILES or (p.is_file() and p.suffix in (".safetensors", ".json")):
        return True
    if p.is_dir() and not p.is_symlink() and not p.name.startswith("checkpoint-"):
        with contextlib.suppress(OSError):
            return any(c.name == "config.json" or c.suffix == ".safetensors" for c in p.iterdir())
    return False


def _swap_in(tmp: Path, dest: Path) -> None:
    if not dest.exists() and not dest.is_symlink():
        os.rename(tmp, dest)
        return
    is_model = (dest / "config.json").is_file()
    if not is_model or _holds_cwd(dest):
        # not a model: keep what it holds, move the new files in. A model folder that is (or holds)
        # the working directory is updated the same way, entry by entry (swapping it would leave
        # the shell in a deleted folder), and the old model's other files are then removed
        stale = [e for e in dest.iterdir() if not (tmp / e.name).exists() and _is_model_entry(e)] if is_model else []
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == "config.json"):  # config.json last
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                _replace_dir(entry, target)
            else:
                if entry.is_dir() and (target.exists() or target.is_symlink()):
                    target.unlink()  # a file where the new folder goes
                os.replace(entry, target)
        shutil.rmtree(tmp, ignore_errors=True)
        for e in stale:
            shutil.rmtree(e, ignore_errors=True) if e.is_dir() and not e.is_symlink() else e.unlink(missing_ok=True)
        return
    if _exchange(tmp, dest):  # tmp now holds the old model
        old = tmp
    else:
        old = dest.with_name(_OLD.format(name=dest.name, pid=os.getpid(), tag=uuid.uuid4().hex[:8]))
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)
            raise
    _fsync_dir(dest.parent)
    for entry in list(old.iterdir()):  # what is not part of the old model (a user's files) stays
        if not (dest / entry.name).exists() and not _is_model_entry(entry):
            with contextlib.suppress(OSError):
                os.rename(entry, dest / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _holds_cwd(dest: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    d = dest.resolve()
    return cwd == d or d in cwd.parents


def _replace_dir(new: Path, target: Path) -> None:
    aside = target.with_name(_OLD.format(name=target.name, pid=os.getpid(), tag=uuid.uuid4().hex[:8]))
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def replace_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """``with replace_folder(dest) as tmp:`` write the whole new folder into ``tmp``; on a normal
    exit it replaces ``dest`` (see the module docstring), on an exception ``dest`` is untouched.

    ``dest`` that is a symlink to a folder is written through (the folder it points at is
    replaced); ``dest`` that is an existing file is refused before anything is written."""
    dest = Path(dest).expanduser()
    if dest.is_symlink() and dest.is_dir():
        dest = dest.resolve()
    dest = Path(os.path.abspath(dest))
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest}: exists and is not a folder: not saved there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_leftovers(dest)
    tmp = dest.with_name(_TMP.format(name=dest.name, pid=os.getpid(), tag=uuid.uuid4().hex[:8]))
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write one file so that readers see the old content or the new, never a part: a temporary
    sibling, flushed, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.saving-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


# ---- one writer per output folder -------------------------------------------------------------

class FolderBusyError(ValueError):
    """Another live process holds the folder's lock (the message names it)."""


def _start_time(pid: int) -> str:
    """The process's start time (Linux ``/proc/<pid>/stat`` field 22; "" elsewhere): with the pid it
    tells a live holder from a new process that got a dead holder's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _holder_alive(info: dict) -> bool:
    import socket

    try:
        pid = int(info.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if info.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process (a shared folder): it cannot be checked from here
    if pid <= 0 or not _pid_alive(pid):
        return False
    started = info.get("started_ticks")
    return not started or not _start_time(pid) or started == _start_time(pid)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "ccad", name: str = ".ccad.lock") -> Iterator[Path]:
    """Hold ``folder/name`` (created with ``O_EXCL``; it records the pid, host, start time and
    ``what``) for the ``with`` block, so that two runs never write one folder at once. A lock
    held by a live process is a :class:`FolderBusyError` naming that run; a lock left by a
    process that is gone (killed) is taken over. The lock file is removed on exit."""
    import json
    import socket
    import time

    folder = Path(folder)
    lock = folder / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "started_ticks": _start_time(os.getpid())}
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                info = {}  # half written by a holder that is starting: look again
                if time.time() - _mtime(lock) < 5:
                    time.sleep(0.05)
                    continue
            if _holder_alive(info):
                raise FolderBusyError(
                    f"{folder}: in use by another run ({info.get('what', 'ccad')}, pid {info.get('pid')}"
                    + (f" on {info['host']}" if info.get("host") and info.get("host") != me["host"] else "")
                    + f", started {info.get('started', '?')}): wait for it to finish or choose another folder "
                    f"(if that run is gone, remove {lock})") from None
            stale = lock.with_name(f"{name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):  # one taker wins the rename; the others look again
                os.rename(lock, stale)
                stale.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise FolderBusyError(f"{folder}: could not take its lock {lock}")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            held = json.loads(lock.read_text() or "{}")
            if held.get("pid") == me["pid"] and held.get("started_ticks") == me["started_ticks"]:
                lock.unlink()


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
