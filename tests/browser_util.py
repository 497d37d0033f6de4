"""Helpers for the end-to-end browser tests: find Debian's Chromium, serve the app on a free
127.0.0.1 port in this process, open pages with Playwright, and save screenshots as artifacts."""
from __future__ import annotations

import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def find_chromium() -> Optional[str]:
    """The Chromium binary: $CHROMIUM, else `chromium` / `chromium-browser` on PATH, else None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_or_skip() -> str:
    """The Chromium binary, else skip the calling test module (call at module level) with how to
    install it; playwright missing skips too."""
    import pytest

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary found (install Debian's: apt-get update && apt-get install -y chromium; "
                    "or set CHROMIUM=/path/to/chromium)", allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    return chromium


def wait_text(page: Any, elem_id: str, needle: str, timeout_ms: int = 60_000) -> None:
    """Wait until the element ``#elem_id`` shows ``needle`` in its text."""
    page.wait_for_function("([id, s]) => (document.getElementById(id)?.innerText || '').includes(s)",
                           arg=[elem_id, needle], timeout=timeout_ms)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(demo: Any, timeout: float = 60.0) -> Iterator[str]:
    """Serve a built gr.Blocks through ``app.main.launch`` (the options ``ccad app`` uses) on
    127.0.0.1:<free port> without blocking; yield its URL."""
    from app.main import launch

    port = free_port()
    launch(host="127.0.0.1", port=port, demo=demo, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield url
    finally:
        demo.close()


@contextmanager
def browser_page(chromium: str, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in a headless Chromium started from ``chromium`` (no Playwright download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def textbox_value(page: Any, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def wait_textbox(page: Any, elem_id: str, predicate: Any, timeout: float = 60.0) -> str:
    """Poll a Gradio textbox until ``predicate(value)`` holds; return the value."""
    deadline = time.time() + timeout
    value = ""
    while time.time() < deadline:
        value = textbox_value(page, elem_id)
        if predicate(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"#{elem_id} never satisfied the condition; last value {value!r}")


def fill_textbox(page: Any, elem_id: str, text: str, timeout: float = 30.0) -> None:
    """Type ``text`` into a Gradio textbox once the front end has bound it.

    Right after ``goto`` the input exists before Gradio's front end is hydrated, and a value
    typed then is reset; so fill, check the bound value, and fill again until it sticks.
    """
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.wait_for(state="visible")
    page.wait_for_timeout(1000)  # let the front end finish its start-up updates
    deadline = time.time() + timeout
    while True:
        box.fill(text)
        page.wait_for_timeout(300)
        if box.input_value() == text:
            return
        if time.time() > deadline:
            raise AssertionError(f"#{elem_id} did not keep the typed value {text!r}")


@contextmanager
def offline_train_app(tmp_path_factory: Any, engine: Any = None, prepare: Any = None,
                      configure: Any = None) -> Iterator[tuple[str, Path, Any]]:
    """The app served on a free port with ``HF_HUB_OFFLINE=1`` over a tiny generated one-texture
    data root (``synth/fibrous``); ``prepare(root)`` runs before the controller is built,
    ``configure(controller)`` before the app is built on it. Yields
    ``(url, root, controller)`` and restores ``HF_HUB_OFFLINE`` afterwards."""
    from app.controller import AppController
    from app.main import build_app
    from ccad.data.synthetic import write_dataset

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        root = tmp_path_factory.mktemp("data")
        write_dataset(root / "synth", kinds=("fibrous",), n_train=6, n_test_good=1, n_test_defect=1, size=32,
                      seed=2, defects=("spot",))
        if prepare is not None:
            prepare(root)
        kw = {} if engine is None else {"engine": engine}
        ctl = AppController(data_root=root, state_dir=tmp_path_factory.mktemp("state"), samples_dir=None,
                            demo_dir=None, **kw)
        ctl.hub_cache_dir = str(tmp_path_factory.mktemp("hub-cache"))
        ctl.hub_probe = lambda: False
        if configure is not None:
            configure(ctl)
        with serve(build_app(ctl)) as url:
            yield url, root, ctl
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def open_train(page: Any, url: str) -> None:
    """Open the app's Train tab and wait for its method box."""
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-method input").first.wait_for(state="visible")


def select_dropdown(page: Any, elem_id: str, label: str) -> None:
    """Choose ``label`` in the Gradio dropdown ``elem_id`` by typing it and pressing Enter."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(label)
    page.wait_for_timeout(300)
    box.press("Enter")
    page.keyboard.press("Escape")
