"""Server paths the app may touch: confinement to an allowed root and safe zip extraction.

The app lets a user type a folder path (a dataset, a model, where to save a bank). Every such
path is resolved *inside* the allowed root given by ``--data-root``: ``..`` components are
refused outright and a path (or a symlink on the way) that resolves outside the root is refused,
so a user of a shared server cannot read or write anything else on the machine.
Uploaded zips are extracted with the same rule for every member (no absolute names, no ``..``,
no links) and with limits on the member count and the uncompressed size (zip bombs): the total
uncompressed size from the zip's headers must fit a disk budget (``CCAD_APP_ZIP_BUDGET_MB``,
default 1024 MB) and the free disk space before anything is written, and extraction stops as soon
as the bytes written exceed what the headers announced. :func:`extracted_zip` extracts into a
per-request folder that is removed when the request is done.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator, Optional


class PathError(ValueError):
    """A user-supplied path or archive was refused; the message says which and why."""


MAX_ZIP_MEMBERS = 20_000
MAX_ZIP_BYTES = int(float(os.environ.get("CCAD_APP_ZIP_BUDGET_MB", "1024")) * 1024**2)
DISK_MARGIN_BYTES = 256 * 1024**2  # free space kept on the disk after an extraction


def resolve_in_root(user_path: str | os.PathLike, root: str | os.PathLike, must_exist: bool = True,
                    kind: str = "folder") -> Path:
    """Resolve ``user_path`` (relative to ``root`` or absolute) and require it to stay inside ``root``.

    Refuses empty input, any ``..`` component, and paths (including symlinks anywhere on the way)
    whose real location is outside the real ``root``. ``kind`` ("folder", "file" or "any") is
    checked when ``must_exist``.
    """
    text = str(user_path or "").strip()
    if not text:
        raise PathError("no path given: type a folder inside the data root " f"({root})")
    if "\x00" in text:
        raise PathError("the path contains a NUL character")
    parts = PurePosixPath(text).parts + PureWindowsPath(text).parts
    if any(p == ".." for p in parts):
        raise PathError(f"{text!r}: '..' is not allowed; give a path inside the data root {root}")
    root_real = Path(root).expanduser().resolve()
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = candidate.resolve()
    if real != root_real and root_real not in real.parents:
        raise PathError(f"{text!r} is outside the allowed data root {root_real} "
                        "(symlinks out of the root are refused too)")
    if must_exist:
        if not real.exists():
            raise PathError(f"{text!r} does not exist under the data root {root_real}")
        if kind == "folder" and not real.is_dir():
            raise PathError(f"{text!r} is not a folder")
        if kind == "file" and not real.is_file():
            raise PathError(f"{text!r} is not a file")
    return real


def count_images(folder: Path) -> int:
    """Number of image files below ``folder`` (recursive), for 'empty folder' messages."""
    from ccad.data.io import list_images  # the one image-extension list (ccad.data.io.IMAGE_EXTENSIONS)

    return len(list_images(folder, recursive=True))


def _mb(n: float) -> str:
    return f"{n / 1024**2:.1f} MB"


def safe_extract_zip(zip_path: str | os.PathLike, dest: Optional[str | os.PathLike] = None,
                     max_members: int = MAX_ZIP_MEMBERS, max_bytes: Optional[int] = None) -> Path:
    """Extract an uploaded zip into ``dest`` (a new temp folder by default) and return that folder.

    Every member must be a plain file or folder with a relative name without ``..``; links,
    absolute names, more than ``max_members`` members or more than ``max_bytes`` uncompressed
    bytes (the disk budget, read from the zip's headers before anything is written; default
    :data:`MAX_ZIP_BYTES`) are refused with :class:`PathError`, and so is a zip that would not fit
    the free disk space. While extracting, a member that decompresses to more bytes than its
    header says stops the extraction. A single top-level folder is returned itself, so
    ``good.zip`` containing ``good/*.png`` yields the ``good`` folder.
    """
    budget = MAX_ZIP_BYTES if max_bytes is None else int(max_bytes)
    zp = Path(zip_path)
    if not zipfile.is_zipfile(zp):
        raise PathError(f"{zp.name}: not a zip archive (upload a .zip of images or of a model folder)")
    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="ccad-upload-"))
    out.mkdir(parents=True, exist_ok=True)
    out_real = out.resolve()
    with zipfile.ZipFile(zp) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise PathError(f"{zp.name}: {len(infos)} members, more than the limit of {max_members}")
        total = sum(i.file_size for i in infos)
        if total > budget:
            raise PathError(f"{zp.name}: {_mb(total)} uncompressed, more than the upload budget of "
                            f"{_mb(budget)} (nothing was extracted; upload a smaller zip or split it)")
        free = shutil.disk_usage(out_real).free
        if total + DISK_MARGIN_BYTES > free:
            raise PathError(f"{zp.name}: {_mb(total)} uncompressed, but the server has only {_mb(free)} of "
                            "free disk space (nothing was extracted)")
        for info in infos:
            name = info.filename
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise PathError(f"{zp.name}: member {name!r} is a symbolic link; links are refused")
            pp = PurePosixPath(name.replace("\\", "/"))
            if pp.is_absolute() or ".." in pp.parts or (pp.parts and ":" in pp.parts[0]):
                raise PathError(f"{zp.name}: member {name!r} has an unsafe path")
            target = (out_real / pp).resolve()
            if target != out_real and out_real not in target.parents:
                raise PathError(f"{zp.name}: member {name!r} would land outside the extraction folder")
        written = 0
        for info in infos:
            if "__MACOSX" in info.filename:
                continue
            target = out_real / PurePosixPath(info.filename.replace("\\", "/"))
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > total or written > budget:
                        raise PathError(f"{zp.name}: member {info.filename!r} holds more data than the zip's "
                                        "headers say; extraction stopped")
                    dst.write(chunk)
    entries = [p for p in out_real.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return out_real


@contextmanager
def extracted_zip(zip_path: str | os.PathLike, parent: str | os.PathLike, prefix: str = "upload-",
                  max_bytes: Optional[int] = None) -> Iterator[Path]:
    """:func:`safe_extract_zip` into a new per-request folder under ``parent``, removed (with all
    it holds) when the ``with`` block ends, also when it fails."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield safe_extract_zip(zip_path, work, max_bytes=max_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_stale(parent: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Remove the folders under ``parent`` last changed over ``older_than_s`` ago (what a server
    that was killed mid-request left behind); returns how many were removed."""
    p = Path(parent)
    if not p.is_dir():
        return 0
    n, now = 0, time.time()
    for child in p.iterdir():
        try:
            if child.is_dir() and not child.is_symlink() and now - child.stat().st_mtime > older_than_s:
                shutil.rmtree(child, ignore_errors=True)
                n += 1
        except OSError:
            continue
    return n


def keep_newest(parent: str | os.PathLike, prefix: str, keep: int) -> int:
    """Remove all but the ``keep`` newest folders named ``prefix*`` under ``parent`` (what one
    request writes and Gradio has already copied into its own cache, e.g. the Inspect tab's
    ``dl-*`` downloads); returns how many were removed."""
    p = Path(parent)
    if not p.is_dir():
        return 0
    found = []
    for child in p.iterdir():
        try:
            if child.name.startswith(prefix) and child.is_dir() and not child.is_symlink():
                found.append((child.stat().st_mtime, child.name, child))
        except OSError:
            continue
    found.sort(reverse=True)
    for _, _, child in found[max(0, int(keep)):]:
        shutil.rmtree(child, ignore_errors=True)
    return max(0, len(found) - max(0, int(keep)))


UPLOAD_CACHE_BYTES = int(float(os.environ.get("CCAD_APP_UPLOAD_CACHE_MB", "1024")) * 1024**2)


def trim_file_cache(files: "set[str] | list[set[str]]", max_bytes: int = UPLOAD_CACHE_BYTES,
                    grace_s: float = 120.0) -> int:
    """Bound Gradio's file cache of one app (its uploads and the files it served: the
    ``Blocks.temp_file_sets``) to ``max_bytes``: the oldest files are removed first (and their
    folders when they are left empty) until the rest fits; a file younger than ``grace_s`` is
    kept (a request may be reading it). Returns the bytes removed. Only files Gradio recorded for
    this app are touched; each removed name leaves its set (a name not on disk yet stays in it)."""
    sets = files if isinstance(files, list) else [files]
    seen: dict[str, tuple[float, int]] = {}
    for s in sets:
        for name in list(s):
            try:
                st = os.lstat(name)
            except OSError:  # not there (yet: Gradio moves an upload into place after answering)
                continue
            seen[name] = (st.st_ctime, st.st_size)
    total = sum(size for _, size in seen.values())
    removed, now = 0, time.time()
    for name, (ctime, size) in sorted(seen.items(), key=lambda kv: kv[1][0]):
        if total <= max_bytes or now - ctime < grace_s:
            break
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        for s in sets:
            s.discard(name)
        total -= size
        removed += size
        try:
            os.rmdir(os.path.dirname(name))  # Gradio keeps each file in its own hash folder
        except OSError:
            pass
    return removed
