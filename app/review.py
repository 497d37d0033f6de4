"""The DAGM review tab: check and correct tight-mask proposals for DAGM's ellipse weak labels.

UI logic only; the method (proposals, IoU, the decision store, export) is :mod:`ccad.relabel`,
the components and their wiring are :mod:`app.tabs.review`. :class:`ReviewUI` holds the
plain-Python callbacks so that they can be tested without a browser.

Decisions are written to ``<state_dir>/sessions/<folder-id>/decisions.json`` after every action,
so a page reload (or a server restart with a persistent ``state_dir``) resumes where the
annotator left off: load the same folder again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np

from ccad.relabel import ReviewSession, class_normal_images, mask_iou, overlay, render_heatmap

from .paths import PathError, resolve_in_root

__all__ = ["ReviewUI", "editor_value", "mask_from_editor"]

ELLIPSE_COLOR = (255, 200, 0)
MASK_COLOR = (255, 40, 40)
EDIT_RGBA = (255, 0, 0, 150)  # the proposal: a filled red layer, the image visible through it
PANEL_HEIGHT = 320
AUTO = "auto: the model in use if built on this class, else a PatchCore built on the class"
IN_USE = "the model in use"
PER_CLASS_MAX_SIZE = 256
PER_CLASS_BANK = 64
EXPORTS_KEPT = 4  # the last review export zips of this server kept on disk (older ones are removed)
#: How the per-class bank's sources are named on the page, by :func:`ccad.relabel.class_normal_images` source.
_SOURCE_WORDS = {"good Train images": "good Train", "good Test images": "good Test",
                 "images without a defect label": "without a defect label"}
#: The editor's starting canvas. gr.ImageEditor (Gradio 6) centres a layer in the larger of the
#: canvas and the background, so with the default 800 x 800 canvas a 512 px image got its mask
#: layer drawn 144 px right of and below the image, and the first stroke saved it there. A canvas
#: smaller than any image makes the background's size the canvas size.
EDITOR_CANVAS = (16, 16)
#: Brush and eraser radius (image px). Gradio's "auto" radius was ~18 px on a 512 px DAGM image: one dab
#: (~1000 px) swamped a 270 px proposal. A tight mask needs a fine brush (the size is adjustable).
EDITOR_BRUSH = 4
#: The editor's height (CSS): about the width of the page's content, but no taller than the window,
#: so that a (square) DAGM image, which the editor zooms to fit, is shown as wide as the editor where
#: the window allows (it was a small stamp in a 300 px box; issue 21).
EDITOR_HEIGHT = "min(calc(100vw - 100px), calc(100vh - 80px))"

#: Stable element ids (browser tests and users' automation find the components by them).
def _note_image(text: str, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """A grey placeholder with a short note (e.g. 'no model loaded')."""
    img = np.full((size[0], size[1], 3), 235, np.uint8)
    y = size[0] // 2 - 10 * (text.count("\n"))
    for line in text.split("\n"):
        (w, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        cv2.putText(img, line, (max(4, (size[1] - w) // 2), y), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (90, 90, 90), 1, cv2.LINE_AA)
        y += 22
    return img


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def editor_value(image: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """``gr.ImageEditor`` value: the image as background, the mask as a translucent red layer."""
    layer = np.zeros(mask.shape + (4,), np.uint8)
    layer[np.asarray(mask) > 0] = EDIT_RGBA
    return {"background": _u8(image), "layers": [layer], "composite": None}


def mask_from_editor(value: Any, shape: tuple[int, int]) -> np.ndarray:
    """The edited mask from a ``gr.ImageEditor`` value (dict with background/layers/composite).

    Painted pixels are those with alpha > 0 in any layer (brush adds, eraser clears); with no
    layers, the pixels where the composite differs from the background. Resized (nearest) to
    ``shape`` if the editor changed the size.
    """
    if not isinstance(value, dict):
        raise ValueError("no edited mask: draw on the mask editor first")
    layers = [np.asarray(x) for x in (value.get("layers") or []) if x is not None]
    if layers:
        mask = np.zeros(layers[0].shape[:2], bool)
        for lay in layers:
            if lay.ndim == 3 and lay.shape[2] == 4:
                part = lay[..., 3] > 0
            else:
                part = (lay.reshape(lay.shape[0], lay.shape[1], -1) > 0).any(axis=2)
            if part.shape != mask.shape:
                part = cv2.resize(part.astype(np.uint8), (mask.shape[1], mask.shape[0]),
                                  interpolation=cv2.INTER_NEAREST) > 0
            mask |= part
    else:
        comp, bg = value.get("composite"), value.get("background")
        if comp is None or bg is None:
            raise ValueError("the mask editor is empty: load an item first")
        comp, bg = np.asarray(comp)[..., :3].astype(int), np.asarray(bg)[..., :3].astype(int)
        mask = (np.abs(comp - bg) > 8).any(axis=2)
    if mask.shape != tuple(shape):
        mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]),
                          interpolation=cv2.INTER_NEAREST) > 0
    return mask


class ReviewUI:
    """Callbacks of the review tab (plain Python; Gradio only wires them).

    Sessions are shared per folder within the server process (one store per folder under
    ``state_dir/sessions``), so two browser tabs on one folder see the same decisions.
    """

    def __init__(self, get_detector: Callable[[], Any], data_root: str | os.PathLike[str],
                 state_dir: str | os.PathLike[str], models: Optional[Callable[[], list[str]]] = None,
                 get_model: Optional[Callable[[str], Any]] = None,
                 fit: Optional[Callable[..., Any]] = None,
                 active_name: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.get_detector = get_detector
        self.active_name = active_name  # the name of the model in use (shown on screen)
        self.models = models
        self.get_model = get_model
        self.fit = fit  # builds a fit-only detector from good samples (default: ccad.pipeline.fit_detector)
        self._choice: dict[str, str] = {}  # session key -> heatmap model choice
        self._class_dets: dict[tuple[str, str], Any] = {}  # (session key, class) -> (detector, note) or None
        self.data_root = Path(data_root).expanduser().resolve()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, ReviewSession] = {}
        self._lock = threading.RLock()
        self._exports: list[Path] = []  # this server's export folders, the last EXPORTS_KEPT kept

    # -- sessions ----------------------------------------------------------------------------
    def store_for(self, folder: Path) -> Path:
        digest = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in folder.name)[:40]
        return self.state_dir / "sessions" / f"{name}-{digest}"

    def last_folder(self) -> str:
        """The folder loaded last (pre-fills the folder box after a page reload)."""
        try:
            return json.loads((self.state_dir / "last.json").read_text()).get("folder", "")
        except (OSError, ValueError):
            return ""

    def session(self, key: Optional[str]) -> ReviewSession:
        if not key or key not in self._sessions:
            raise ValueError("no folder loaded: type a DAGM folder and press Load")
        return self._sessions[key]

    # -- the heatmap model ---------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        """The heatmap-model dropdown: auto (per-class PatchCore where needed), the model in use,
        then every loaded model by name."""
        names = list(self.models()) if self.models is not None else []
        return [AUTO, IN_USE, *names]

    def choose_model(self, key: Optional[str], choice: str, opacity: float = 0.5,
                     mode: str = "outline") -> list[Any]:
        """Use ``choice`` (a :meth:`model_choices` entry) for this folder's heatmaps and proposals."""
        if key:
            self._choice[key] = choice or AUTO
        return self.views(key, opacity, mode)

    @staticmethod
    def built_on(det: Any, category: str, good: Optional[list[Any]] = None) -> bool:
        """Whether ``det`` was built on the DAGM class ``category``: its training categories are
        exactly that class, or its bank's source (``meta["source_hash"]``) is that class's good images."""
        if not category:
            return True  # nothing to compare with (a loose folder without classes)
        info = getattr(det, "info", None) or {}
        cats = info.get("categories") if isinstance(info, dict) else None
        if cats:
            return list(cats) == [category]
        bank = getattr(det, "bank", None)
        src = (getattr(bank, "meta", None) or {}).get("source_hash") if bank is not None else None
        if src and good:
            try:
                from ccad.features.stream import ImageStream

                return ImageStream(good, 64).source_hash() == src
            except Exception:
                return False
        return False

    def _good_of_class(self, sess: ReviewSession, category: str) -> Any:
        """Every non-defective image of the class that the folder holds
        (:func:`ccad.relabel.class_normal_images`: good Train, good Test, or without a label file);
        None when there are none or the folder is no DAGM layout."""
        if sess.root is None or not category:
            return None
        try:
            found = class_normal_images(sess.root, category)
        except Exception:
            return None
        return found if found.samples else None

    @staticmethod
    def bank_source_text(found: Any) -> str:
        """What the per-class bank was built from, with the counts: "all 40 of its non-defective
        images (36 good Train, 4 good Test)", "all 2 of its images without a defect label (no
        label file)"."""
        n = len(found.samples)
        counts = dict(found.counts or {found.source: n})
        if len(counts) == 1:
            words = next(iter(counts))
            if words == "images without a defect label":
                return f"all {n} of its images without a defect label (no label file)"
            return f"all {n} of its {words}"
        parts = ", ".join(f"{k} {_SOURCE_WORDS.get(w, w)}" for w, k in counts.items())
        return f"all {n} of its non-defective images ({parts})"

    def _in_use_name(self) -> str:
        try:
            name = self.active_name() if self.active_name is not None else None
        except Exception:
            name = None
        return str(name) if name else "the model in use"

    def _class_detector(self, key: str, sess: ReviewSession, category: str,
                        found: Any) -> tuple[Any, str]:
        """A fit-only detector (the registry's first method that needs no training: PatchCore) built
        from every non-defective image of the class (``found``, :meth:`_good_of_class`), once per
        folder and class; and its name with how many images it was built from."""
        import time

        if (key, category) in self._class_dets:
            return self._class_dets[(key, category)]
        from ccad.methods import get_method, method_names

        variant = next(n for n in method_names() if not get_method(n).trainable)
        side = int(max(sess.image().shape[:2]))
        size = int(min(PER_CLASS_MAX_SIZE, max(32, side)))
        fit = self.fit
        if fit is None:
            from ccad.pipeline import fit_detector as fit
        t0 = time.perf_counter()
        det = fit(list(found.samples), variant=variant, image_size=size, bank_size=PER_CLASS_BANK,
                  calibration_fraction=0.0)
        title = (get_method(variant).title or variant).split(":")[0].split(" (")[0]
        note = (f"**a {title} built on {category} from {self.bank_source_text(found)}** (a bank of "
                f"{PER_CLASS_BANK} patches at {size} px, built here in {time.perf_counter() - t0:.1f} s)")
        self._class_dets[(key, category)] = (det, note)
        return det, note

    def _map_source(self, key: Optional[str] = None,
                    sess: Optional[ReviewSession] = None) -> tuple[Optional[Callable[[np.ndarray], np.ndarray]],
                                                                   Any, str, str]:
        """(map function, cache tag, why there is none, which model makes the heatmap)."""
        choice = self._choice.get(key or "", AUTO)
        try:
            if choice not in (AUTO, IN_USE) and self.get_model is not None:
                det = self.get_model(choice)
                if det is None:
                    return None, None, f"model {choice!r} is not loaded", ""
                using = f"Heatmap and proposal from **{choice}** (picked)."
            else:
                det = self.get_detector() if self.get_detector is not None else None
                name = self._in_use_name()
                using = ("Heatmap and proposal from **the model in use**." if name == "the model in use"
                         else f"Heatmap and proposal from **{name}** (the model in use).")
        except Exception as exc:  # a broken model must not break the review
            return None, None, f"model unavailable ({type(exc).__name__}: {exc})", ""
        if choice == AUTO and sess is not None and len(sess):
            category = sess.current.category
            found = self._good_of_class(sess, category) if category else None
            good = list(found.samples) if found is not None else []
            if det is None or not self.built_on(det, category, good):
                name = self._in_use_name()
                in_use = "the model in use" + (f" (**{name}**)" if name != "the model in use" else "")
                why = "no model is loaded" if det is None else f"{in_use} was not built on {category}"
                if good:
                    try:
                        det, note = self._class_detector(key or "", sess, category, found)
                        using = f"{why[0].upper() + why[1:]}: heatmap and proposal from {note}."
                    except Exception as exc:
                        using = (f"{why[0].upper() + why[1:]}; building a per-class model failed "
                                 f"({type(exc).__name__}: {exc}).")
                elif det is not None:
                    using = (f"⚠️ {in_use[0].upper() + in_use[1:]} was not built on {category}, and the "
                             f"folder holds no non-defective {category} images to build a per-class bank "
                             f"from; heatmap and proposal from **{name}**.")
        if det is None:
            return None, None, "no model loaded", ""

        def amap(image: np.ndarray) -> np.ndarray:
            return np.asarray(det.predict(image).anomaly_map, np.float32)

        return amap, id(det), "", using

    def _confine(self, sess: ReviewSession) -> int:
        """Drop items whose files resolve outside the data root (symlinks out); returns count."""
        keep, dropped = [], 0
        for it in sess.items:
            paths = [p for p in (it.image_path, it.label_path, it.exact_path) if p]
            real = [Path(p).resolve() for p in paths]
            if all(r == self.data_root or self.data_root in r.parents for r in real):
                keep.append(it)
            else:
                dropped += 1
        sess.items = keep
        sess.index = min(sess.index, max(len(keep) - 1, 0))
        return dropped

    # -- views -------------------------------------------------------------------------------
    def views(self, key: Optional[str], opacity: float = 0.5, mode: str = "outline",
              status: str = "") -> list[Any]:
        """[status, original, ellipse overlay, mask overlay, heatmap, editor, progress, item]."""
        if not key or key not in self._sessions:
            return [status or "Type a DAGM folder (inside the data root) and press **Load**.",
                    None, None, None, None, None, "0 / 0 reviewed", ""]
        with self._lock:
            sess = self._sessions[key]
            if not len(sess):
                return [status or "No labelled images in this folder.", None, None, None, None,
                        None, sess.progress_text(), ""]
            fn, tag, why, using = self._map_source(key, sess)
            sess.set_anomaly_map_fn(fn, tag)
            notes = [using] if using else []
            try:
                amap = sess.anomaly_map()
            except Exception as exc:
                sess.set_anomaly_map_fn(None, None)
                amap, why = None, f"the model failed on this image ({type(exc).__name__}: {exc})"
            if amap is None:
                notes.append(f"Heatmap: {why}; the proposal uses the image cue only.")
            img = sess.image()
            ell = sess.ellipse()
            mask = sess.mask()
            mode = mode if mode in ("fill", "outline") else "outline"
            op = float(opacity if opacity is not None else 0.5)
            heat = (render_heatmap(amap, img, 0.55) if amap is not None
                    else _note_image(f"{why}\n(heatmap needs a model)", img.shape[:2]))
            it = sess.current
            dec = sess.decision()
            state = dec["decision"] if dec else "undecided (showing the proposal)"
            area = int(mask.sum())
            info = (f"**{sess.index + 1} / {len(sess)}** · `{it.key}` · {state} · mask area {area} px"
                    f" · IoU with ellipse {mask_iou(mask, ell):.2f}")
            exact = sess.exact()
            if exact is not None:
                info += f" · IoU with exact mask {mask_iou(mask, exact):.2f}"
            msg = " ".join([status] + notes).strip()
            return [msg, _u8(img), overlay(img, ell, ELLIPSE_COLOR, op, mode),
                    overlay(img, mask, MASK_COLOR, op, mode), heat, editor_value(img, mask),
                    sess.progress_text(), info]

    def _error(self, key: Optional[str], exc: BaseException, opacity: float, mode: str) -> list[Any]:
        out = self.views(key, opacity, mode)
        out[0] = f"⚠️ {exc}"
        return out

    # -- callbacks ---------------------------------------------------------------------------
    def load(self, folder: str, opacity: float = 0.5, mode: str = "outline") -> list[Any]:
        """Load a DAGM folder (confined to the data root); returns [session key, *views]."""
        try:
            path = resolve_in_root(folder, self.data_root, kind="folder")
        except PathError as exc:
            return [None, *self.views(None, opacity, mode, f"⚠️ {exc}")]
        key = str(path)
        with self._lock:
            try:
                sess = self._sessions.get(key) or ReviewSession(path, self.store_for(path))
            except (OSError, ValueError) as exc:
                return [None, *self.views(None, opacity, mode, f"⚠️ cannot read {folder!r}: {exc}")]
            dropped = self._confine(sess)
            self._sessions[key] = sess
            try:
                (self.state_dir / "last.json").write_text(json.dumps({"folder": folder}))
            except OSError:
                pass
        if not len(sess):
            msg = (f"⚠️ No labelled DAGM images in `{folder}` (expected ClassN/Train|Test with "
                   "Label/*_label.PNG, or classN/*.PNG with true_masks/<stem>_label.PNG)")
        else:
            msg = f"Loaded {len(sess)} labelled image(s) from `{folder}`"
        if sess.unlabelled:
            msg += f"; {len(sess.unlabelled)} image(s) without a label are skipped (unknown, not good)"
        if dropped:
            msg += f"; {dropped} item(s) refused: their files resolve outside the data root"
        if len(sess) and sess.n_reviewed:
            msg += f"; resumed: {sess.n_reviewed} already reviewed"
        return [key, *self.views(key, opacity, mode, msg + ".")]

    def navigate(self, key: Optional[str], delta: int, opacity: float = 0.5,
                 mode: str = "outline") -> list[Any]:
        try:
            with self._lock:
                sess = self.session(key)
                sess.goto(sess.index + int(delta))
        except (ValueError, IndexError) as exc:
            return self._error(key, exc, opacity, mode)
        return self.views(key, opacity, mode)

    def _decide(self, key: Optional[str], action: str, opacity: float, mode: str,
                advance: bool, editor: Any = None) -> list[Any]:
        try:
            with self._lock:
                sess = self.session(key)
                if not len(sess):
                    raise ValueError("nothing to review in this folder")
                it = sess.current
                if action == "accept":
                    sess.accept()
                elif action == "reject":
                    sess.reject()
                else:
                    mask = mask_from_editor(editor, sess.image().shape[:2])
                    sess.save_edit(mask)
                msg = f"{it.key}: {sess.decision()['decision']} (saved)."
                if advance and sess.index < len(sess) - 1:
                    sess.next()
        except (ValueError, IndexError, OSError) as exc:
            return self._error(key, exc, opacity, mode)
        return self.views(key, opacity, mode, msg)

    def accept(self, key: Optional[str], opacity: float = 0.5, mode: str = "outline",
               advance: bool = True) -> list[Any]:
        return self._decide(key, "accept", opacity, mode, advance)

    def reject(self, key: Optional[str], opacity: float = 0.5, mode: str = "outline",
               advance: bool = True) -> list[Any]:
        return self._decide(key, "reject", opacity, mode, advance)

    def save_edit(self, key: Optional[str], editor: Any, opacity: float = 0.5,
                  mode: str = "outline", advance: bool = True) -> list[Any]:
        return self._decide(key, "edit", opacity, mode, advance, editor)

    def export(self, key: Optional[str]) -> tuple[Optional[str], str]:
        """Export masks + decisions.csv and zip them; returns (zip path, status)."""
        try:
            sess = self.session(key)
        except ValueError as exc:
            return None, f"⚠️ {exc}"
        # the system temp dir: Gradio serves downloads from there without extra allowed_paths
        out_root = Path(tempfile.mkdtemp(prefix="ccad-review-export-"))
        name = Path(key or "dagm").name or "dagm"
        folder = out_root / f"{name}-masks"
        with self._lock:
            csv_path = sess.export(folder)
        zpath = out_root / f"{name}-masks.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(out_root).as_posix())
        n_masks = sum(1 for _ in folder.rglob("*.png"))
        shutil.rmtree(folder, ignore_errors=True)  # the zip holds it all
        with self._lock:  # bounded: the last EXPORTS_KEPT export zips of this server stay downloadable
            self._exports.append(out_root)
            while len(self._exports) > EXPORTS_KEPT:
                shutil.rmtree(self._exports.pop(0), ignore_errors=True)
        using = ""
        if len(sess):
            try:  # keep the model that makes the proposals named on screen
                with self._lock:
                    using = self._map_source(key, sess)[3]
            except Exception:
                using = ""
        return str(zpath), (f"Exported {n_masks} mask(s) and {csv_path.name} "
                            f"({sess.progress_text()}). {using}").strip()
