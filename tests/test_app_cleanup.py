"""What the app writes to disk stays bounded (issue 20 item 7, issue 21 item 3): Gradio's upload
cache (kept under a byte budget on a real server, real HTTP uploads), the Inspect tab's download
folders (the last few kept), the DAGM review's export zips (the last few kept); and ``ccad app``
says which folder it serves."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.controller import AppController
from test_app import FakeDetector, grey


def _size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def test_the_upload_cache_stays_under_its_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from app.main import build_app
    from browser_util import serve

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.setenv("CCAD_APP_UPLOAD_CACHE_MB", "1")  # 1 MiB
    monkeypatch.setenv("CCAD_APP_CACHE_CHECK_S", "0.2")
    monkeypatch.setenv("CCAD_APP_CACHE_GRACE_S", "0")
    root = tmp_path / "data"
    root.mkdir()
    ctl = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    demo = build_app(ctl, load_default=False)
    payload = bytes(range(256)) * 400  # 100 KiB, 35 uploads = 3.4 MiB
    with serve(demo) as url:
        with httpx.Client(timeout=30) as http:
            last = []
            for i in range(35):
                r = http.post(url + "gradio_api/upload", files=[("files", (f"up{i}.png", payload + bytes([i]),
                                                                           "image/png"))])
                r.raise_for_status()
                last = r.json()
        deadline = time.time() + 60
        while _size(cache)[1] > 1024**2:
            if time.time() > deadline:
                raise AssertionError(f"the upload cache holds {_size(cache)} (files, bytes) after 60 s")
            time.sleep(0.2)
        n, nbytes = _size(cache)
        assert 0 < n < 35 and nbytes <= 1024**2
        assert Path(last[0]).is_file()  # the newest upload is kept


def test_download_folders_are_bounded(tmp_path: Path) -> None:
    from app.control.inspection import DOWNLOADS_KEPT

    ctl = AppController(data_root=tmp_path, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    ctl.registry.add("fake", FakeDetector(), "test")
    batch = ctl.inspect("fake", [str(grey(tmp_path / "a.png", 20)), str(grey(tmp_path / "b.png", 120))])
    files: list[str] = []
    for _ in range(DOWNLOADS_KEPT + 12):
        files = ctl.downloads(batch, 0.3)
    folders = [p for p in (tmp_path / "state" / "downloads").iterdir() if p.name.startswith("dl-")]
    assert len(folders) == DOWNLOADS_KEPT
    assert all(Path(f).is_file() for f in files)  # the latest inspection's files are there


def test_review_export_zips_are_bounded(tmp_path: Path) -> None:
    from app.review import EXPORTS_KEPT, ReviewUI
    from ccad.data.synthetic import write_dataset

    root = tmp_path / "data"
    write_dataset(root / "dagm", kinds=("granular",), n_train=0, n_test_good=0, n_test_defect=1, size=64,
                  layout="dagm", defects=("spot",))
    ui = ReviewUI(lambda: None, root, tmp_path / "state")
    key = ui.load("dagm")[0]
    ui.accept(key)
    zips: list[Path] = []
    for _ in range(EXPORTS_KEPT + 3):
        zips.append(Path(ui.export(key)[0]))
    alive = [z for z in zips if z.exists()]
    assert alive == zips[-EXPORTS_KEPT:]
    for z in alive:  # only the zip stays (the folder it was made from is removed)
        assert [p.name for p in z.parent.iterdir()] == [z.name]


def test_ccad_app_says_which_folder_it_serves(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import gradio as gr

    from ccad.cli import main

    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    monkeypatch.setattr(AppController, "load_startup", lambda self, model=None: "")
    monkeypatch.setattr("app.main.start_cache_janitor", lambda demo: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CCAD_STATE_DIR", str(tmp_path / "state"))
    assert main(["app"]) == 0
    out = capsys.readouterr().out
    assert f"serving the folders under {tmp_path.resolve()}" in out and "--data-root" in out
