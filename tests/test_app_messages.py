"""What the page says (issue 21 item 3): error messages never show server paths (a file is named
as it was uploaded, or by its path inside the uploaded zip)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from app.controller import AppController, UserError
from app.tabs.common import error_text
from test_app import FakeDetector, grey


@pytest.fixture()
def ctl(tmp_path: Path) -> AppController:
    root = tmp_path / "data"
    root.mkdir()
    c = AppController(data_root=root, state_dir=tmp_path / "state", samples_dir=None, demo_dir=None)
    c.registry.add("fake", FakeDetector(), "test")
    return c


def test_an_unreadable_upload_is_named_as_uploaded(ctl: AppController, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gradio_dir = tmp_path / "gradio-uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gradio_dir))
    bad = gradio_dir / ("0" * 40) / "scan 7.png"  # where Gradio keeps an upload
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a png")
    (gradio_dir / ("1" * 40)).mkdir()
    good = grey(gradio_dir / ("1" * 40) / "ok.png", 90)
    batch = ctl.inspect("fake", [str(bad), str(good)])
    (name, msg), = batch.errors
    assert name == "scan 7.png" and "scan 7.png" in msg
    assert str(gradio_dir) not in msg and "0" * 40 not in msg
    with pytest.raises(UserError) as err:  # every image unreadable: the whole message
        ctl.inspect("fake", [str(bad)])
    shown = error_text(err.value)
    assert "scan 7.png" in shown and str(gradio_dir) not in shown


def test_a_broken_model_zip_names_its_own_files(ctl: AppController, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("mymodel/config.json", "{not json")
    up = tmp_path / "up" / "mymodel.zip"
    up.parent.mkdir()
    up.write_bytes(buf.getvalue())
    with pytest.raises(UserError) as err:
        ctl.load_from_zip(str(up))
    shown = error_text(err.value)
    assert "mymodel.zip" in shown and "mymodel/config.json" in shown
    assert str(ctl.state_dir) not in shown and str(ctl.state_dir.resolve()) not in shown
    assert "uploads/" not in shown and "model-" not in shown
