"""Inspect tab: score uploaded images, zips, server folders and samples; the batch table, the four
panels, the histogram, downloads, and the comparison with a second model."""
from __future__ import annotations

import csv
import math
import os
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ccad.data.naming import display_name

from .. import views
from ..batch import (AGREE_HEADER, Batch, domain_text, name_list, relative_name, seconds_text, to_uint8, unique_names,
                     verdict_text)
from ..engine import ProgressFn
from ..errors import UserError, hide_paths
from ..paths import PathError, extracted_zip, keep_newest, remove_stale
from .base import ControllerBase

DOWNLOADS_KEPT = 8  # the Inspect tab's last download folders (dl-*) kept on disk


class InspectMixin(ControllerBase):
    """Scoring images with the model in use and showing the results."""

    def sample_paths(self) -> list[Path]:
        from ccad.data.io import list_images  # the one image-extension list (ccad.data.io.IMAGE_EXTENSIONS)

        if self.samples_dir is None or not self.samples_dir.is_dir():
            return []
        return list_images(self.samples_dir)

    def gallery_items(self) -> list[tuple[np.ndarray, str]]:
        """(image, caption) for the sample gallery; images are loaded so no path needs serving."""
        items = []
        for p in self.sample_paths():
            try:
                items.append((to_uint8(self.engine.load_image(p)), p.stem))
            except Exception:
                continue
        return items

    def inspect(self, name: Optional[str], files: Sequence[Any], progress: ProgressFn = None,
                base: Optional[str | os.PathLike] = None, left_out: Sequence[tuple[str, str]] = ()) -> Batch:
        """Run the model on uploaded files (paths; a ``.zip`` is opened and its images inspected);
        bad files are listed in ``batch.errors``, after ``left_out`` (``(name, reason)`` of the files
        a chosen folder held that are not images) and the non-image files of a zip. Each file is
        named by its path relative to what was uploaded or chosen: ``base`` (a chosen folder), the
        zip's root, or else its file name (numbered where two uploads share one)."""
        det = self._detector(name)
        raw = [str(getattr(f, "name", f)) for f in (files or []) if f]
        if not raw:
            raise UserError("no image given: upload one or more images or click a sample")
        paths: list[str] = []
        shown: dict[str, str] = {}
        from_zip: set[str] = set()
        skipped = list(left_out)
        with ExitStack() as stack:  # each zip is extracted into its own folder, removed once scored
            for f in raw:
                if f.lower().endswith(".zip"):
                    images, not_images = self._zip_images(f, stack)
                    skipped += not_images
                    for p, rel in images:
                        paths.append(p)
                        shown[p] = rel
                        from_zip.add(p)
                else:
                    paths.append(f)
                    shown[f] = relative_name(f, base)
            if not paths:
                raise UserError("no image given: the zip(s) hold no images (.png/.jpg/.bmp/.tif)"
                                + (f"; left out: {name_list(skipped)}" if skipped else ""))
            try:
                preds, errors = det.predict_many(paths, batch_size=4, on_error="skip", progress=progress)
            except Exception as exc:
                raise UserError(f"the model failed on this batch ({type(exc).__name__}: "
                                f"{hide_paths(display_name(str(exc)), shown)})") from None
        errors = skipped + [(shown.get(p, relative_name(p)), hide_paths(display_name(msg), shown)) for p, msg in errors]
        if not preds:
            raise UserError("no readable image: " + "; ".join(f"{n}: {m}" for n, m in errors[:5]))
        names = unique_names([shown.get(str(p.path), relative_name(p.path)) if p.path else f"image {i}"
                              for i, p in enumerate(preds)])
        # an image from a zip no longer exists on disk: later runs (comparison, re-scoring) use its pixels
        preds = [replace(p, path=None) if p.path is not None and str(p.path) in from_zip else p for p in preds]
        order = sorted(range(len(preds)), key=lambda i: -float(preds[i].score))
        return Batch(model=name or "", predictions=preds, names=names, errors=errors, selected=order[0])

    def _zip_images(self, zip_file: str, stack: ExitStack) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """``(extracted path, path inside the zip)`` of every image in an uploaded zip, and
        ``(path inside the zip, reason)`` of its other files (hidden files aside). The zip is
        extracted into a per-request folder that ``stack`` removes when it closes."""
        from ccad.data.skips import find_images, unsupported_reason
        from ccad.data.io import list_images

        try:
            root = stack.enter_context(extracted_zip(zip_file, self.uploads_dir, "inspect-", self.zip_budget))
        except PathError as exc:
            raise UserError(str(exc)) from None
        not_images = find_images([root])[1]
        return ([(str(p), p.relative_to(root).as_posix()) for p in list_images(root, recursive=True)],
                [(relative_name(q, root), unsupported_reason(q)) for q in not_images])

    def inspect_folder(self, name: Optional[str], folder: str, progress: ProgressFn = None) -> Batch:
        """Inspect every image under a server folder (inside the data root, recursively); each is
        named by its path relative to that folder."""
        from ccad.data.skips import find_images, unsupported_reason
        from ccad.data.io import list_images

        path = self._in_root(folder)

        def inside(p: Path) -> bool:  # no links out of the data root
            return p.resolve() == self.data_root or self.data_root in p.resolve().parents

        images = [p for p in list_images(path, recursive=True) if inside(p)]
        not_images = find_images([path])[1]
        left_out = [(relative_name(str(q), path), unsupported_reason(q)) for q in not_images if inside(Path(q))]
        if not images:
            raise UserError(f"{folder}: the folder holds no images (.png/.jpg/.bmp/.tif)"
                            + (f"; left out: {name_list(left_out)}" if left_out else ""))
        return self.inspect(name, [str(p) for p in images], progress=progress, base=path, left_out=left_out)

    def inspect_sample(self, name: Optional[str], index: int) -> Batch:
        paths = self.sample_paths()
        if not 0 <= int(index) < len(paths):
            raise UserError(f"no sample number {index}")
        return self.inspect(name, [str(paths[int(index)])])

    def table_rows(self, batch: Optional[Batch], threshold: Optional[float]) -> list[list[Any]]:
        """Batch table, worst (highest score) first: ``#, file, score, verdict, seconds (that image's
        own time), training domain``."""
        if batch is None:
            return []
        preds = batch.at(threshold)
        rows = [self._row(i, batch.names[i], p) for i, p in enumerate(preds)]
        return sorted(rows, key=lambda r: -r[2] if math.isfinite(r[2]) else -math.inf)

    @staticmethod
    def _row(i: int, name: str, p: Any) -> list[Any]:
        score = float(p.score)
        return [i, name, round(score, 5) if math.isfinite(score) else score, p.verdict, seconds_text(p.seconds),
                domain_text(p, short=True)]

    def batch_label(self, batch: Optional[Batch], compared: str = "") -> str:
        """The batch table's label: which model scored it (verdicts belong to that model)."""
        if batch is None or not batch.predictions:
            return "Batch (inspect images to fill it)"
        if compared:
            return (f"Batch scored by {batch.model} and by {compared} (disagreements first, then worst first by "
                    f"{batch.model}; {compared}'s verdicts at its own calibrated threshold; click a row to show it)")
        return f"Batch scored by {batch.model} (worst first; click a row to show it; click a header to sort)"

    def compare_table(self, other: Optional[str], batch: Optional[Batch],
                      threshold: Optional[float] = None) -> tuple[list[str], list[list[Any]]]:
        """The batch and its comparison batch as ONE table (issue 21): per image its '#' (row
        clicks select it), file, the score and verdict of the model in use (at ``threshold``),
        those of ``other`` (at its own calibrated threshold), whether the two verdicts agree
        (:data:`AGREE_HEADER`) and each model's training-domain note. Disagreements first, then
        worst first by the model in use. Returns ``(headers, rows)``; no comparison: ``([], [])``."""
        cmp = self.compare_batch(other, batch)
        if cmp is None or batch is None:
            return [], []
        a, b = batch.at(threshold), cmp.predictions
        rows = []
        for i in range(len(a)):
            if not {a[i].status, b[i].status} <= {"good", "anomalous"}:
                mark = "? no verdict"  # an error or an uncalibrated model agrees with nothing
            else:
                mark = "✓ same" if a[i].status == b[i].status else "✗ DIFFERS"
            ra, rb = self._row(i, batch.names[i], a[i]), self._row(i, cmp.names[i], b[i])
            rows.append([i, batch.names[i], ra[2], ra[3], rb[2], rb[3], mark, ra[5], rb[5]])

        def key(r: list[Any]) -> tuple[int, float, str]:
            score = float(r[2])
            return (0 if r[6].startswith("✗") else 1, -score if math.isfinite(score) else math.inf, r[1])

        rows.sort(key=key)
        first, second = batch.model, other
        headers = ["#", "file", f"score · {first}", f"verdict · {first}", f"score · {second}",
                   f"verdict · {second}", AGREE_HEADER, f"training domain · {first}", f"training domain · {second}"]
        return headers, rows

    def out_of_domain_names(self, batch: Optional[Batch]) -> list[str]:
        """Names of the batch's images whose features lie far outside the model's training
        distribution (``Prediction.out_of_domain``, where the engine reports it)."""
        if batch is None:
            return []
        return [n for n, p in zip(batch.names, batch.predictions) if getattr(p, "out_of_domain", None)]

    # ---- a batch's verdicts belong to the model that scored it
    def batch_for(self, name: Optional[str], batch: Optional[Batch]) -> Optional[Batch]:
        """``batch`` when the model ``name`` scored it, else None: a threshold, histogram or card of
        one model is never applied to scores of another."""
        if batch is None or batch.model != (name or ""):
            return None
        return batch

    def rescore(self, name: Optional[str], batch: Batch, progress: ProgressFn = None) -> Batch:
        """The same images scored by the model ``name`` (a new :class:`Batch` of that model; names,
        left-out files and the selected row kept). Images that came from a zip are re-run from
        their decoded pixels (the extracted files are gone)."""
        det = self._detector(name)
        preds = []
        for i, p in enumerate(batch.predictions):
            item = p.path if p.path and Path(p.path).is_file() else p.image
            try:
                q = det.predict(item)
            except Exception as exc:
                raise UserError(f"{name} failed on {batch.names[i]} ({type(exc).__name__}: {exc})") from None
            preds.append(q if q.path == p.path else replace(q, path=p.path))
            if progress is not None:
                progress(i + 1, len(batch.predictions))
        return Batch(model=name or "", predictions=preds, names=list(batch.names), errors=list(batch.errors),
                     selected=batch.selected)

    def switch_model(self, name: Optional[str], batch: Optional[Batch],
                     progress: ProgressFn = None) -> tuple[Optional[Batch], str]:
        """After the model in use changed to ``name`` (picked, or a bank build that finished): the
        batch re-scored by ``name`` (its verdicts at ``name``'s threshold), or None (cleared) when
        that fails; and a line saying which. An unchanged model keeps the batch as it is."""
        if batch is None or not batch.predictions or batch.model == (name or ""):
            return batch, ""
        old = batch.model
        if not name or self.registry.get(name) is None:
            return None, f"The batch scored by {old} was cleared: no model in use."
        try:
            new = self.rescore(name, batch, progress)
        except UserError as exc:
            return None, (f"⚠️ The batch scored by {old} was cleared (its verdicts do not hold for {name}); "
                          f"re-scoring it failed: {exc}")
        return new, (f"Re-scored the {len(new.predictions)} image(s) of the batch with {name} (they had been "
                     f"scored by {old}): every verdict now is {name}'s, at its threshold.")

    def training_data_text(self, name: Optional[str]) -> str:
        """What the model in use was trained on (from its card / info.json), and that images unlike
        those are out of its domain; for the bundled demo, what the demo is."""
        entry = self.registry.get(name)
        if entry is None:
            return ""
        det = entry.detector
        info = getattr(det, "info", None) or {}
        try:
            card = det.card() or {}
        except Exception:
            card = {}
        n = card.get("n_train_images", info.get("n_train_images"))
        cats = card.get("categories") or info.get("categories") or []
        size = card.get("image_size")
        demo = info.get("demo") if isinstance(info.get("demo"), dict) else None
        what = ", ".join(f"'{c}'" for c in cats) if cats else ""
        if demo is not None and entry.source == "bundled demo model":
            kind = demo.get("kind") or (cats[0] if cats else "?")
            n_txt = f"{n} " if n else ""
            return (f"**The bundled demo ({entry.name}) was trained on {n_txt}synthetic '{kind}' texture images only** "
                    f"(generated by ccad.data.synthetic, {demo.get('size', size)} px; built by "
                    f"{demo.get('built_by', 'scripts/build_demo.py')}). It knows nothing else: real parts, other "
                    "textures or photos are out of its domain and its verdicts on them mean little. Build a bank "
                    "or train a model on your own good images for a real inspection.")
        parts = [f"**{entry.name}** was trained on"]
        parts.append(f"{n} good image(s)" if n else "good images")
        if what:
            parts.append(f"of {what}")
        parts.append(f"({entry.source})." if entry.source else ".")
        return " ".join(parts) + " Images unlike those are out of its domain: its verdicts on them mean little."

    def panels(self, batch: Optional[Batch], index: Optional[int] = None,
               threshold: Optional[float] = None) -> dict[str, Any]:
        """The four aligned panels (uint8, same size) and the score / verdict / time of one result."""
        if batch is None or not batch.predictions:
            return {"original": None, "reconstruction": None, "heatmap": None, "overlay": None,
                    "recon_label": "Reconstruction", "score": "", "verdict": "", "time": "", "name": "",
                    "model": "", "domain": ""}
        i = batch.selected if index is None else int(index)
        p = batch.at(threshold)[i]
        original = to_uint8(p.image)
        if p.reconstruction is not None:
            recon, label = to_uint8(p.reconstruction), "Reconstruction"
        else:
            recon = np.full_like(original, 128)
            label = "Reconstruction (n/a: this method does not reconstruct)"
        original, recon, heat, over = _with_scale(p, original, recon)
        verdict = verdict_text(p)
        return {"original": original, "reconstruction": recon, "heatmap": heat, "overlay": over,
                "has_reconstruction": p.reconstruction is not None,
                "recon_label": label, "score": f"{float(p.score):.4f}", "verdict": verdict,
                "time": seconds_text(p.seconds), "name": batch.names[i], "model": batch.model,
                "domain": domain_text(p) or "not reported by this model"}

    def select_row(self, batch: Optional[Batch], row_value: Sequence[Any]) -> Batch:
        """Select the clicked table row (by its '#' column, so sorting the table does not matter)."""
        if batch is None:
            raise UserError("no batch to select from")
        try:
            idx = int(row_value[0])
        except (TypeError, ValueError, IndexError):
            raise UserError(f"cannot read the clicked row {row_value!r}") from None
        if not 0 <= idx < len(batch.predictions):
            raise UserError(f"row {idx} is not in the current batch")
        batch.selected = idx
        return batch

    def histogram(self, name: Optional[str], batch: Optional[Batch], threshold: Optional[float]) -> Any:
        """The calibration good scores of ``name`` and the batch's scores, only when ``name`` scored
        the batch (two models' scores are never drawn on one axis), titled with the model."""
        det = self.registry.detector(name) if name else None
        cal = getattr(det, "calibration", None) if det is not None else None
        good = cal.good_scores if cal is not None else None
        batch = self.batch_for(name, batch)
        scores = [p.score for p in batch.predictions] if batch else []
        t = float(threshold) if threshold is not None else float("nan")
        return views.score_histogram(good, scores, t, model=name or "")

    def downloads(self, batch: Optional[Batch], threshold: Optional[float]) -> list[str]:
        """Write the selected result's heatmap, overlay and binary mask PNGs and the batch CSV."""
        if batch is None or not batch.predictions:
            return []
        from PIL import Image

        dl_root = self.state_dir / "downloads"
        # Gradio serves its own copy of what it was given (its cache, bounded by the app's janitor): the
        # folders here only take space; keep the last few (and none over an hour old)
        remove_stale(dl_root)
        keep_newest(dl_root, "dl-", DOWNLOADS_KEPT - 1)
        dl_root.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="dl-", dir=dl_root))
        preds = batch.at(threshold)
        p = preds[batch.selected]
        stem = Path(batch.names[batch.selected]).stem or "image"
        files = []
        for suffix, arr in (("heatmap", p.heatmap()), ("overlay", p.overlay()),
                            ("mask", (p.mask.astype(np.uint8) * 255))):
            f = out / f"{stem}_{suffix}.png"
            Image.fromarray(arr).save(f)
            files.append(str(f))
        f = out / "batch_scores.csv"
        with f.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "score", "threshold", "verdict", "seconds"])
            for name, q in sorted(zip(batch.names, preds), key=lambda t: -float(t[1].score)):
                w.writerow([name, f"{float(q.score):.6f}", f"{float(q.threshold):.6f}", q.verdict,
                            f"{float(q.seconds):.3f}"])
        files.append(str(f))
        return files

    def compare_batch(self, other: Optional[str], batch: Optional[Batch],
                      progress: ProgressFn = None) -> Optional[Batch]:
        """The whole batch through a second model (row ``i`` is the same image in both; cached per
        model on the batch, so row clicks and threshold moves do not re-run it)."""
        if not other or batch is None or not batch.predictions:
            return None
        if other in batch.compared:
            return batch.compared[other]
        det = self._detector_no_activate(other)
        preds = []
        for i, p in enumerate(batch.predictions):
            try:
                preds.append(det.predict(p.path if p.path else p.image))
            except Exception as exc:
                raise UserError(f"{other} failed on {batch.names[i]} ({type(exc).__name__}: {exc})") from None
            if progress is not None:
                progress(i + 1, len(batch.predictions))
        out = Batch(model=other, predictions=preds, names=list(batch.names), selected=batch.selected)
        batch.compared[other] = out
        return out

    def compare(self, other: Optional[str], batch: Optional[Batch]) -> dict[str, Any]:
        """The second model's four panels for the selected image of the batch."""
        cmp = self.compare_batch(other, batch)
        if cmp is None or batch is None:
            return self.panels(None)
        cmp.selected = batch.selected
        return self.panels(cmp, batch.selected)

    def agreement(self, other: Optional[str], batch: Optional[Batch],
                  threshold: Optional[float] = None) -> dict[str, Any]:
        """Verdict agreement of the model in use (at ``threshold``) and ``other`` (at its own
        calibrated threshold) over the whole batch: counts and the files they disagree on."""
        cmp = self.compare_batch(other, batch)
        if cmp is None or batch is None:
            return {"agree": 0, "disagree": 0, "both_anomalous": 0, "both_good": 0, "no_verdict": [], "only_first": [],
                    "only_second": [], "text": ""}
        # statuses, not is_anomalous: an error or an uncalibrated verdict is neither good nor anomalous,
        # so it never counts as "both good" (or as agreement with a "good")
        a = [p.status for p in batch.at(threshold)]
        b = [p.status for p in cmp.predictions]
        only_a = [batch.names[i] for i, (x, y) in enumerate(zip(a, b)) if x == "anomalous" and y == "good"]
        only_b = [batch.names[i] for i, (x, y) in enumerate(zip(a, b)) if y == "anomalous" and x == "good"]
        unsure = [batch.names[i] for i, (x, y) in enumerate(zip(a, b)) if not {x, y} <= {"good", "anomalous"}]
        both_bad = sum(1 for x, y in zip(a, b) if x == y == "anomalous")
        both_good = sum(1 for x, y in zip(a, b) if x == y == "good")
        n = len(a)
        agree = both_bad + both_good
        text = (f"**Agreement on {n} image(s): {agree} agree** ({both_bad} both anomalous, {both_good} both "
                f"good), **{len(only_a) + len(only_b)} disagree**")
        if only_a:
            text += f". Only {batch.model} flags: " + ", ".join(f"`{x}`" for x in only_a[:10])
        if only_b:
            text += f". Only {other} flags: " + ", ".join(f"`{x}`" for x in only_b[:10])
        if unsure:
            text += (f". **{len(unsure)} without a verdict** from one of the models (uncalibrated or an error): "
                     + ", ".join(f"`{x}`" for x in unsure[:10]))
        return {"agree": agree, "disagree": len(only_a) + len(only_b), "both_anomalous": both_bad,
                "both_good": both_good, "no_verdict": unsure,
                "only_first": only_a, "only_second": only_b, "text": text + "."}


PANEL_MIN_WIDTH = 320  # small images are enlarged (nearest) so the colour scale's labels stay legible


def _with_scale(p: Any, original: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four panels at one size: the heatmap and overlay with the model's colour scale under
    them (score units, the threshold marked; issue 21 item 2), the image panels with an empty strip
    of the same height, all enlarged to at least :data:`PANEL_MIN_WIDTH` pixels wide."""
    import cv2

    from ccad.scoring.heatmap import with_colorbar

    heat = p.heatmap()
    over = p.overlay(heat=heat)  # the overlay blends the same heatmap: drawn once
    panels = [original, recon, heat, over]
    w = heat.shape[1]
    if w < PANEL_MIN_WIDTH:
        f = PANEL_MIN_WIDTH / w
        panels = [cv2.resize(a, (PANEL_MIN_WIDTH, max(1, round(a.shape[0] * f))), interpolation=cv2.INTER_NEAREST)
                  for a in panels]
    original, recon, heat, over = panels
    lo, hi = p.display_range()
    heat, over = with_colorbar(heat, lo, hi, p.threshold), with_colorbar(over, lo, hi, p.threshold)
    strip = heat.shape[0] - original.shape[0]
    if strip > 0:  # the image panels keep the same size (aligned), with an empty strip
        original = np.concatenate([original, np.full((strip, *original.shape[1:]), 255, np.uint8)])
        recon = np.concatenate([recon, np.full((strip, *recon.shape[1:]), 255, np.uint8)])
    return original, recon, heat, over
