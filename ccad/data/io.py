"""Reading and writing image and mask files.

Every image file that enters ccad goes through :func:`load_image` (masks: :func:`load_mask`). The
result is the convention of the whole package: ``float32`` ``H x W x 3`` in ``[0, 1]`` (grey
images replicated to three channels, alpha dropped, 16-bit scaled by 65535; the conversion is
:func:`ccad.data.convert.to_float_rgb`). These are the inputs ``x_0`` of the CCAD paper (eq. 15
trains on them, eq. 16 compares them to reconstructions). Anything else a user may hand over (a
PIL image, an array, a tensor) goes through :func:`ccad.data.coerce.coerce_image`.

Files are decoded with OpenCV (``IMREAD_UNCHANGED``, BGR -> RGB) and, when OpenCV cannot decode a
file, with Pillow. A missing, empty, corrupt, oversized or non-image file raises
:class:`ImageReadError`, whose message names the file and the reason, so that a batch loader can
report it and go on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Union

import numpy as np

try:  # OpenCV is the primary decoder; Pillow is the fallback.
    import cv2  # type: ignore

    cv2.setNumThreads(1)
except Exception:  # pragma: no cover - opencv is a hard dependency, but keep reading possible
    cv2 = None  # type: ignore

from PIL import Image

from ccad.data.convert import to_float_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MAX_SIDE",
    "ImageReadError",
    "ImageFormatWarning",
    "is_image_file",
    "list_images",
    "read_raw",
    "load_image",
    "load_mask",
    "save_image",
    "save_mask",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File suffixes (lower case) treated as images by loaders and accepted by :func:`load_image`.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)

#: Images larger than this many pixels are refused before decoding (decompression-bomb guard).
MAX_PIXELS: int = 100_000_000

#: Images are read at most this many pixels on their longer side (aspect kept, area-averaged;
#: JPEGs decoded reduced by the codec's DCT scaling): an 8000 x 8000 PNG is read as 2048 x 2048,
#: so memory per image stays bounded (the models work at <= 256 px). ``None``: full size.
#: Pass ``max_side=`` to :func:`load_image` / :func:`read_raw` to override per call.
MAX_SIDE: int | None = 2048

#: The Pillow formats a file's *content* may have for each accepted extension. Content in a
#: format not listed at all (a GIF renamed ``.png``) is refused with :class:`ImageReadError`;
#: content in another accepted format (a JPEG renamed ``.png``) is read with an
#: :class:`ImageFormatWarning` naming the file.
CONTENT_FORMATS: dict[str, frozenset[str]] = {
    ".png": frozenset({"PNG"}),
    ".jpg": frozenset({"JPEG", "MPO"}),
    ".jpeg": frozenset({"JPEG", "MPO"}),
    ".bmp": frozenset({"BMP", "DIB"}),
    ".tif": frozenset({"TIFF"}),
    ".tiff": frozenset({"TIFF"}),
    ".webp": frozenset({"WEBP"}),
    ".pgm": frozenset({"PPM"}),
    ".ppm": frozenset({"PPM"}),
    ".pbm": frozenset({"PPM"}),
    ".pnm": frozenset({"PPM"}),
}
_SUPPORTED_CONTENT = frozenset().union(*CONTENT_FORMATS.values())
_LOSSY_CONTENT = frozenset({"JPEG", "MPO", "WEBP"})

_LOSSY = frozenset({".jpg", ".jpeg", ".webp"})


class ImageReadError(ValueError):
    """An image or mask file could not be read.

    Attributes:
        path: the file that failed (as given).
        reason: a short human-readable reason (``"file not found"``, ``"cannot decode ..."``).
    """

    def __init__(self, path: PathLike | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")

    def __reduce__(self):  # keep picklable for DataLoader workers
        return (type(self), (self.path, self.reason))


class ImageFormatWarning(UserWarning):
    """A file's content is an accepted image format other than its extension says (a JPEG
    named ``.png``): it is read by its content; the message names the file."""


def is_image_file(path: PathLike) -> bool:
    """True when ``path`` has an image suffix (case-insensitive), see :data:`IMAGE_EXTENSIONS`."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``directory`` (hidden files skipped); ``[]`` if it does not exist."""
    d = Path(directory)
    if not d.is_dir():
        return []
    it = d.rglob("*") if recursive else d.iterdir()
    out = [
        p
        for p in it
        if p.is_file() and not p.name.startswith(".") and is_image_file(p)
    ]
    return sorted(out)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _not_regular(path: Path) -> str | None:
    """Why ``path`` is no regular file (following symlinks), or None when it is one: checked before
    anything opens it, so a FIFO, ``/dev/zero`` or a socket never blocks or streams a read."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"a broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "file not found"
    except OSError as e:
        return f"cannot access file ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    via = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
    return f"not a regular file: {kind}{via}"


def _check_file(path: Path, original: PathLike) -> None:
    why = _not_regular(path)
    if why is not None:
        raise ImageReadError(original, why)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        shown = suffix or "(no extension)"
        raise ImageReadError(
            original,
            f"unsupported file type {shown}; supported: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageReadError(original, f"cannot access file ({e.strerror or e})") from e
    if size == 0:
        raise ImageReadError(original, "file is empty (0 bytes)")


def _check_pixels(h: int, w: int, original: PathLike) -> None:
    if h <= 0 or w <= 0:
        raise ImageReadError(original, f"image has an empty size {w}x{h}")
    if h * w > MAX_PIXELS:
        raise ImageReadError(
            original,
            f"image is {w}x{h} = {h * w / 1e6:.1f} megapixels, over the limit of "
            f"{MAX_PIXELS / 1e6:.0f} megapixels (possible decompression bomb)",
        )


def _header_info(path: Path, original: PathLike) -> tuple[int, int, int, str] | None:
    """(H, W, EXIF orientation, Pillow format) from the file header via Pillow (no pixel
    decoding), or None if Pillow cannot tell. Orientation is 1 when there is no EXIF tag."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                orient = 1
                if im.format in ("JPEG", "MPO", "WEBP", "TIFF", "PNG"):
                    try:
                        orient = int(im.getexif().get(0x0112, 1) or 1)
                    except Exception:
                        orient = 1
                return int(h), int(w), orient, str(im.format or "")
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            original,
            f"image too large, over the limit of {MAX_PIXELS / 1e6:.0f} megapixels "
            f"(possible decompression bomb): {e}",
        ) from e
    except Exception:
        return None


def _apply_orientation(a: np.ndarray, orient: int) -> np.ndarray:
    """Apply an EXIF orientation (2..8) so that the array is upright, as viewers show it."""
    if orient == 2:
        return a[:, ::-1]
    if orient == 3:
        return a[::-1, ::-1]
    if orient == 4:
        return a[::-1]
    if orient == 5:
        return np.swapaxes(a, 0, 1)
    if orient == 6:
        return np.swapaxes(a, 0, 1)[:, ::-1]
    if orient == 7:
        return np.swapaxes(a, 0, 1)[::-1, ::-1]
    if orient == 8:
        return np.swapaxes(a, 0, 1)[::-1]
    return a


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_level: int | None = None


@contextlib.contextmanager
def _quiet_opencv():
    """Silence OpenCV's own decoder log lines; our ImageReadError reports the failure instead."""
    global _quiet_depth, _saved_level
    logging_mod = getattr(getattr(cv2, "utils", None), "logging", None) if cv2 is not None else None
    if logging_mod is None:
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            try:
                _saved_level = logging_mod.getLogLevel()
                logging_mod.setLogLevel(logging_mod.LOG_LEVEL_SILENT)
            except Exception:
                _saved_level = None
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_level is not None:
                try:
                    logging_mod.setLogLevel(_saved_level)
                except Exception:
                    pass


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """Pillow image -> numpy array in RGB(A)/grey order with its native dtype."""
    mode = im.mode
    if mode in ("1",):
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    elif mode == "LA":
        return np.asarray(im)[..., 0]
    return np.asarray(im)


def _reduced_size(h: int, w: int, max_side: int | None) -> tuple[int, int] | None:
    """``(H', W')`` with the longer side ``max_side`` (aspect kept), or None when no reduction."""
    if max_side is None or max(h, w) <= int(max_side):
        return None
    scale = int(max_side) / float(max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _resize_native(arr: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a decoded array (native dtype, H x W or H x W x C) to ``hw``: area averaging
    (the right filter to shrink), or nearest neighbour for masks. Keeps the dtype."""
    h, w = hw
    if tuple(arr.shape[:2]) == (h, w):
        return arr
    dtype = arr.dtype
    work = arr if dtype in (np.uint8, np.uint16, np.float32, np.float64) else arr.astype(np.float64)
    if cv2 is not None:
        out = cv2.resize(np.ascontiguousarray(work), (w, h),
                         interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
        if arr.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
            out = out[..., None]
    else:  # pragma: no cover - OpenCV is a dependency
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(work).astype(np.float64))
        t = t[None, None] if arr.ndim == 2 else t.permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(h, w), mode="nearest" if nearest else "area")[0]
        out = (t[0] if arr.ndim == 2 else t.permute(1, 2, 0)).numpy()
    if out.dtype != dtype:
        out = np.round(out).astype(dtype) if np.issubdtype(dtype, np.integer) else out.astype(dtype)
    return out


def _decode_pil(path: Path, original: PathLike, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """Decode with Pillow. ``reduce_to=(H, W)``: a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) still at least that size (``Image.draft``: the full-size pixels are never
    held), other formats at full size; the caller resizes to the exact size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                _check_pixels(h, w, original)
                if reduce_to is not None and im.format in ("JPEG", "MPO"):
                    im.draft(im.mode, (reduce_to[1], reduce_to[0]))
                im.load()
                return _pil_to_array(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(original, f"image too large (possible decompression bomb): {e}") from e
    except Exception as e:
        raise ImageReadError(original, f"cannot decode image data ({type(e).__name__}: {e})") from e


def _check_content(fmt: str, path: Path, original: PathLike) -> None:
    """Refuse content of an unsupported format whatever the extension (a GIF renamed ``.png``
    is refused, as a ``.gif`` is); warn when the content is another accepted format."""
    if not fmt:
        return
    suffix = path.suffix.lower()
    if fmt not in _SUPPORTED_CONTENT:
        raise ImageReadError(
            original,
            f"the file's content is {fmt}, not the {suffix} its name says; {fmt} is not a supported "
            f"image type (supported: PNG, JPEG, BMP, TIFF, WebP, PNM)",
        )
    if fmt not in CONTENT_FORMATS.get(suffix, frozenset()):
        warnings.warn(ImageFormatWarning(f"'{original}': the file's content is {fmt}, not the {suffix} "
                                         f"its name says; read as {fmt}"), stacklevel=3)


def read_raw(path: PathLike, max_side: int | None | str = "default", nearest: bool = False) -> np.ndarray:
    """Decode an image file to a numpy array with its native dtype, channels in RGB(A) order.

    Returns ``H x W`` (grey) or ``H x W x C`` (C in 3, 4), turned upright by its EXIF
    orientation tag when it has one, at most ``max_side`` pixels on its longer side (default
    :data:`MAX_SIDE`; ``None``: full size): larger images are area-averaged down (``nearest=True``:
    nearest neighbour, for masks), JPEGs decoded reduced by DCT scaling. Raises
    :class:`ImageReadError` for a missing, empty, non-image, oversized (> :data:`MAX_PIXELS`),
    undecodable file or one whose content is an unsupported format (a GIF renamed ``.png``);
    content in another accepted format than the extension says is read with an
    :class:`ImageFormatWarning`.
    """
    limit = MAX_SIDE if max_side == "default" else max_side
    p = Path(os.fspath(path))
    _check_file(p, path)
    hdr = _header_info(p, path)
    reduce_to = None
    if hdr is not None:
        _check_pixels(hdr[0], hdr[1], path)
        _check_content(hdr[3], p, path)
        reduce_to = _reduced_size(hdr[0], hdr[1], limit)
    arr: np.ndarray | None = None
    if reduce_to is not None and hdr is not None and hdr[3] in ("JPEG", "MPO"):
        arr = _decode_pil(p, path, reduce_to)  # reduced decode: never the full-size pixels
    if arr is None and cv2 is not None:
        try:
            buf = np.fromfile(str(p), dtype=np.uint8)  # works with non-ASCII paths too
            with _quiet_opencv():
                arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            del buf
        except Exception:
            arr = None
        if arr is not None and arr.size > 0:
            if arr.ndim == 3 and arr.shape[2] == 3:
                arr = arr[..., ::-1]
            elif arr.ndim == 3 and arr.shape[2] == 4:
                arr = arr[..., [2, 1, 0, 3]]
        else:
            arr = None
    if arr is None:
        arr = _decode_pil(p, path)
    if arr.ndim < 2:
        raise ImageReadError(path, f"decoded data has an unexpected shape {arr.shape}")
    _check_pixels(arr.shape[0], arr.shape[1], path)
    small = _reduced_size(arr.shape[0], arr.shape[1], limit)
    if small is not None:
        arr = _resize_native(arr, small, nearest=nearest)
    if hdr is not None and hdr[2] != 1 and arr.ndim >= 2:
        # IMREAD_UNCHANGED (and Pillow) ignore EXIF orientation: apply it, as photo viewers do
        arr = _apply_orientation(arr, hdr[2])
    return np.ascontiguousarray(arr)


def load_image(path: PathLike, max_side: int | None | str = "default") -> np.ndarray:
    """Read an image file as float32 ``H x W x 3`` in [0, 1] (the ``x_0`` of CCAD eq. 15/16).

    Grey, RGB, RGBA (alpha dropped), 8/16-bit, PNG/JPG/BMP/TIFF, any size up to
    :data:`MAX_PIXELS`, returned at most ``max_side`` (default :data:`MAX_SIDE`) pixels on its
    longer side: the reduction happens on the decoded 8/16-bit data (or in the JPEG decoder),
    never on a full-size float copy. Raises :class:`ImageReadError` naming the file for anything
    unreadable.
    """
    arr = read_raw(path, max_side)
    try:
        return to_float_rgb(arr, source=str(path))
    except ValueError as e:
        raise ImageReadError(path, str(e)) from e


def load_mask(path: PathLike, shape: tuple[int, int] | None = None,
              max_side: int | None | str = "default") -> np.ndarray:
    """Read a ground-truth mask as float32 ``H x W`` in {0, 1} (any channel > 0 is defect).

    For lossy formats (JPEG/WebP) the threshold is half the value range instead of 0, so that
    compression noise is not taken for defect. ``shape=(H, W)`` resizes with nearest neighbour
    when the mask's size differs (masks stored at another resolution than their image). Masks
    larger than ``max_side`` (default :data:`MAX_SIDE`) are reduced with nearest neighbour, as
    their images are (:func:`load_image`). Lossy means the file's content (JPEG/WebP), whatever
    its extension.
    """
    arr = read_raw(path, max_side, nearest=True)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        arr = arr.max(axis=2)
    hdr = _header_info(Path(os.fspath(path)), path)
    lossy = hdr[3] in _LOSSY_CONTENT if hdr is not None and hdr[3] else \
        Path(os.fspath(path)).suffix.lower() in _LOSSY
    if lossy:
        if arr.dtype == np.uint16:
            thr = 32767
        elif np.issubdtype(arr.dtype, np.floating):
            thr = 0.5
        else:
            thr = 127
    else:
        thr = 0
    m = (arr > thr).astype(np.float32)
    if shape is not None:
        h, w = int(shape[0]), int(shape[1])
        if m.shape != (h, w):
            import torch
            import torch.nn.functional as F

            t = torch.from_numpy(m)[None, None]
            m = F.interpolate(t, size=(h, w), mode="nearest")[0, 0].numpy()
    return np.ascontiguousarray(m, dtype=np.float32)


def save_image(path: PathLike, image: np.ndarray) -> Path:
    """Write a float [0,1] (grey ``H x W`` or RGB ``H x W x 3``) or uint8/uint16 image to ``path``.

    Float images are written as 8-bit. The parent folder is created. Returns the path.
    """
    p = Path(os.fspath(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(image)
    if np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_:
        a = np.round(np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        im = Image.fromarray(np.ascontiguousarray(a[..., :3]), mode=None)
    elif a.dtype == np.uint16:
        im = Image.fromarray(a.astype(np.uint16))
    else:
        im = Image.fromarray(np.ascontiguousarray(a))
    suffix = p.suffix.lower()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF", ".webp": "WEBP"}.get(suffix)
    if fmt is None:
        raise ValueError(f"cannot save image '{p}': unsupported suffix {suffix or '(none)'}")
    im.save(p, format=fmt)
    return p


def save_mask(path: PathLike, mask: np.ndarray) -> Path:
    """Write an ``H x W`` mask as an 8-bit 0/255 PNG (or the suffix's format). Returns the path."""
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    return save_image(path, m)
