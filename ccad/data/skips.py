"""Files left out for their extension: reported, never silently dropped.

A loader reads its folders through :func:`read_images`, which notes the non-image files it
passes over; :func:`collect_skipped` gathers them for a caller (the CLI, the app, the pipeline),
and :func:`reports_skipped` makes a loader return a :class:`SampleList` that carries them.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ccad.data.io import is_image_file
from ccad.data.sample import Sample
from ccad.data.tree import MASK_DIR_NAMES, PathLike, abs_path, images_in, looks_like_mask

__all__ = [
    "SampleList",
    "collect_skipped",
    "unsupported_reason",
    "skipped_summary",
    "note_unsupported",
    "read_images",
    "reports_skipped",
    "find_images",
]


class SampleList(list):
    """What every loader returns: a plain ``list[Sample]`` with ``skipped``, the files of the
    folders it read that it left out because their extension is not an image type
    (:data:`ccad.data.io.IMAGE_EXTENSIONS`), as sorted absolute paths. Hidden files, mask files
    (``*_mask``/``*_label``/``*_gt``) and mask folders are not listed: they are not inputs."""

    def __init__(self, items: Iterable[Any] = (), skipped: Iterable[PathLike] = ()) -> None:
        super().__init__(items)
        self.skipped: list[Path] = [Path(p) for p in skipped]


_COLLECTORS: ContextVar[tuple[list[Path], ...]] = ContextVar("ccad_unsupported_files", default=())


@contextmanager
def collect_skipped() -> Iterator[list[Path]]:
    """Collect, in the yielded list, every file with an unsupported extension that a loader
    skips inside the ``with`` block (blocks nest; each file is listed once)::

        with collect_skipped() as skipped:
            det = train_detector("data/", "run")
        print(skipped_summary(skipped))
    """
    found: list[Path] = []
    token = _COLLECTORS.set(_COLLECTORS.get() + (found,))
    try:
        yield found
    finally:
        _COLLECTORS.reset(token)


def unsupported_reason(path: PathLike) -> str:
    """``"unsupported file type .gif"`` (the reason recorded for a skipped file)."""
    suffix = Path(path).suffix.lower()
    return f"unsupported file type {suffix}" if suffix else "unsupported file type (no extension)"


def skipped_summary(paths: Sequence[PathLike], limit: int = 10) -> str:
    """One line: ``"skipped 2 file(s) with unsupported extensions: a.gif, notes.txt"`` ("" for none)."""
    if not paths:
        return ""
    names = [Path(p).name for p in paths]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"skipped {len(names)} file(s) with unsupported extensions: {', '.join(names[:limit])}{more}"


def note_unsupported(d: Path, recursive: bool = False, as_given: bool = False) -> None:
    """Record the non-image files of ``d`` (not hidden, not masks, not in mask folders), as
    absolute paths (symlinks not resolved), or ``as_given``: ``d`` joined with the file's path
    inside it (what ``ccad predict`` shows beside the images it names the same way)."""
    collectors = _COLLECTORS.get()
    if not collectors or not d.is_dir():
        return
    found = []
    for p in d.rglob("*") if recursive else d.iterdir():
        parts = p.relative_to(d).parts
        if any(part.startswith(".") for part in parts):
            continue
        if any(part.lower() in MASK_DIR_NAMES for part in parts[:-1]):
            continue
        if not p.is_dir() and not is_image_file(p) and not looks_like_mask(p):  # FIFOs and broken links too
            found.append(p if as_given else abs_path(p))
    for lst in collectors:
        seen = set(lst)
        lst.extend(q for q in sorted(found) if q not in seen)


def read_images(d: Path, recursive: bool = False) -> list[Path]:
    """The images a loader takes from ``d`` (as :func:`ccad.data.tree.images_in`); the other
    files are noted as skipped (:func:`collect_skipped`). Detection probes use ``images_in``,
    which notes nothing."""
    note_unsupported(d, recursive)
    return images_in(d, recursive=recursive)


def reports_skipped(loader: Callable[..., list[Sample]]) -> Callable[..., list[Sample]]:
    """Make a loader return a :class:`SampleList` whose ``skipped`` lists what it left out."""

    @functools.wraps(loader)
    def wrapper(*args: Any, **kwargs: Any) -> list[Sample]:
        with collect_skipped() as skipped:
            samples = loader(*args, **kwargs)
        return SampleList(samples, sorted(skipped))

    return wrapper


def find_images(inputs: Iterable[PathLike]) -> tuple[list[str], list[Path]]:
    """Files to inspect from files and folders (``ccad predict``): a file is taken as given, a
    folder is searched recursively for image files. Returns ``(images, skipped)``: ``skipped``
    are the folders' files with unsupported extensions. Both are named as given (the folder as
    given joined with the path inside it; a symlink by its own name, never its target). Every
    entry the walk sees is one or the other: an image-named entry that is no regular file (a
    broken symlink, a FIFO, a link to a device) is an image to inspect, which the reader refuses
    with the reason (without opening it), so it gets its own row."""
    items: list[str] = []
    with collect_skipped() as skipped:
        for p in map(Path, inputs):
            if p.is_dir():
                note_unsupported(p, recursive=True, as_given=True)
                items.extend(str(f) for f in sorted(p.rglob("*")) if not f.is_dir() and is_image_file(f))
            else:
                items.append(str(p))
    return items, sorted(skipped)
