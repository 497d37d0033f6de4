"""ccad.data.io: every reader case a user can hit."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ccad.data import io as dio
from ccad.data.coerce import coerce_image
from ccad.data.convert import mask_to_tensor, to_tensor
from ccad.data.io import ImageReadError, load_image, load_mask
from ccad.data.sample import Sample


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    """A uint8 RGB image whose three channels differ (so channel order errors show)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // (w - 1)).astype(np.uint8)
    g = (y * 255 // (h - 1)).astype(np.uint8)
    b = np.full((h, w), 40, np.uint8)
    return np.stack([r, g, b], axis=2)


def _check_format(a: np.ndarray, h: int, w: int) -> None:
    assert a.dtype == np.float32
    assert a.shape == (h, w, 3)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_grey_png_replicated_to_three_channels(tmp_path: Path) -> None:
    g = _gradient()[..., 0]
    p = tmp_path / "grey.png"
    Image.fromarray(g).save(p)
    a = load_image(p)
    _check_format(a, 24, 32)
    np.testing.assert_allclose(a[..., 0], g / 255.0, atol=1e-6)
    np.testing.assert_array_equal(a[..., 0], a[..., 1])
    np.testing.assert_array_equal(a[..., 0], a[..., 2])


def test_rgb_png_keeps_rgb_order(tmp_path: Path) -> None:
    rgb = _gradient()
    p = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(p)
    a = load_image(str(p))
    _check_format(a, 24, 32)
    np.testing.assert_allclose(a, rgb / 255.0, atol=1e-6)  # not BGR


def test_rgba_alpha_dropped(tmp_path: Path) -> None:
    rgb = _gradient()
    alpha = np.zeros(rgb.shape[:2], np.uint8)  # fully transparent: colour must survive
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(p)
    a = load_image(p)
    _check_format(a, 24, 32)
    np.testing.assert_allclose(a, rgb / 255.0, atol=1e-6)


def test_16bit_png_scaled_by_65535(tmp_path: Path) -> None:
    v = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    p = tmp_path / "deep.png"
    assert cv2.imwrite(str(p), v)
    a = load_image(p)
    _check_format(a, 24, 32)
    np.testing.assert_allclose(a[..., 0], v / 65535.0, atol=1e-6)
    assert a[..., 0].max() == pytest.approx(1.0)
    # 16-bit detail survives (more than 256 distinct levels)
    assert len(np.unique(a[..., 0])) > 256


def test_16bit_rgb_tiff(tmp_path: Path) -> None:
    rgb = _gradient().astype(np.uint16) * 257
    p = tmp_path / "deep.tiff"
    assert cv2.imwrite(str(p), rgb[..., ::-1].copy())  # cv2 writes BGR
    a = load_image(p)
    _check_format(a, 24, 32)
    np.testing.assert_allclose(a, rgb / 65535.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".TIFF", ".jpg", ".jpeg"])
def test_other_formats(tmp_path: Path, suffix: str) -> None:
    rgb = _gradient()
    p = tmp_path / f"img{suffix}"
    fmt = {".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG"}
    Image.fromarray(rgb).save(p, format=fmt[suffix.lower()], **({"quality": 95} if "jp" in suffix else {}))
    a = load_image(p)
    _check_format(a, 24, 32)
    tol = 0.08 if "jp" in suffix.lower() else 1e-6
    assert np.abs(a - rgb / 255.0).mean() < tol
    # channel order is right even for the lossy format: red grows along x, green along y
    assert a[12, -1, 0] > a[12, 0, 0] + 0.5
    assert a[-1, 16, 1] > a[0, 16, 1] + 0.5


def test_odd_size_is_kept(tmp_path: Path) -> None:
    p = tmp_path / "odd.png"
    Image.fromarray(np.full((7, 1001), 128, np.uint8)).save(p)
    _check_format(load_image(p), 7, 1001)


def test_palette_png_falls_back_correctly(tmp_path: Path) -> None:
    rgb = _gradient()
    p = tmp_path / "pal.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p)
    a = load_image(p)
    _check_format(a, 24, 32)
    assert np.abs(a - rgb / 255.0).mean() < 0.1


def test_corrupt_bytes_raise_naming_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    with pytest.raises(ImageReadError) as ei:
        load_image(p)
    assert ei.value.path == str(p)
    assert "broken.png" in str(ei.value)


def test_random_bytes_jpg_raise(tmp_path: Path) -> None:
    p = tmp_path / "noise.jpg"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="noise.jpg"):
        load_image(p)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_image(p)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.png"
    with pytest.raises(ImageReadError, match=r"nope\.png.*not found"):
        load_image(p)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(d)


def test_non_image_extension(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes\.txt.*unsupported file type \.txt"):
        load_image(p)


def test_image_read_error_is_value_error_and_picklable(tmp_path: Path) -> None:
    import pickle

    e = ImageReadError(tmp_path / "x.png", "file not found")
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.path == e.path and e2.reason == e.reason


def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(p)
    monkeypatch.setattr(dio, "MAX_PIXELS", 5000)  # 10,000 px image over a 5,000 px limit
    with pytest.raises(ImageReadError, match=r"big\.png.*megapixels.*decompression bomb"):
        load_image(p)


def test_load_mask_binary_and_resized(tmp_path: Path) -> None:
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 10:20] = 255
    m[0, 0] = 1  # any value > 0 is defect
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    out = load_mask(p)
    assert out.dtype == np.float32 and out.shape == (20, 30)
    assert set(np.unique(out)) == {0.0, 1.0}
    assert out.sum() == 5 * 10 + 1
    r = load_mask(p, shape=(40, 60))
    assert r.shape == (40, 60) and set(np.unique(r)) <= {0.0, 1.0}
    assert r.sum() == pytest.approx(4 * out.sum())


def test_load_mask_rgb_and_jpeg_noise(tmp_path: Path) -> None:
    m = np.zeros((32, 32, 3), np.uint8)
    m[8:24, 8:24, 1] = 255  # defect painted only in green
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    assert load_mask(p).sum() == 256
    pj = tmp_path / "m.jpg"
    Image.fromarray(m[..., 1]).save(pj, quality=70)
    mj = load_mask(pj)
    # JPEG ringing around the square is not taken for defect
    assert abs(mj.sum() - 256) < 40


def test_load_mask_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "m_mask.png"
    p.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="m_mask.png"):
        load_mask(p)


def test_to_tensor_and_mask_to_tensor() -> None:
    img = np.random.default_rng(0).random((40, 60, 3)).astype(np.float32)
    t = to_tensor(img, 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    t2 = to_tensor(img, (20, 30))
    assert t2.shape == (3, 20, 30)
    # no resize when the size already matches: values are exact
    same = to_tensor(img, (40, 60))
    np.testing.assert_array_equal(same.permute(1, 2, 0).numpy(), img)
    # antialiased downsampling averages a checkerboard to ~0.5 instead of aliasing
    cb = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    d = to_tensor(np.dstack([cb] * 3), 16)
    assert abs(float(d.mean()) - 0.5) < 0.02 and float(d.std()) < 0.05
    m = np.zeros((40, 60), np.float32)
    m[10:30, 20:40] = 1
    mt = mask_to_tensor(m, 20)
    assert mt.shape == (1, 20, 20)
    assert set(torch.unique(mt).tolist()) == {0.0, 1.0}
    assert mask_to_tensor(None, 8).sum() == 0 and mask_to_tensor(None, 8).shape == (1, 8, 8)


def test_coerce_image_inputs(tmp_path: Path) -> None:
    rgb = _gradient()
    ref = rgb / 255.0
    p = tmp_path / "a.png"
    Image.fromarray(rgb).save(p)
    for x in (p, str(p), Image.open(p), rgb, rgb.astype(np.uint16) * 257, (rgb / 255.0).astype(np.float32)):
        a = coerce_image(x)
        _check_format(a, 24, 32)
        np.testing.assert_allclose(a, ref, atol=1e-5)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    np.testing.assert_allclose(coerce_image(rgba), ref, atol=1e-6)
    grey = coerce_image(rgb[..., 0])
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    grey = Image.fromarray(rgb).convert("L")
    np.testing.assert_allclose(coerce_image(grey), coerce_image(np.asarray(grey)))
    tens = torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1)
    np.testing.assert_allclose(coerce_image(tens), ref, atol=1e-6)
    with pytest.raises(TypeError, match="cannot interpret"):
        coerce_image(12)


def test_sample_record() -> None:
    s = Sample("a.png", None, 0)
    assert s.category == "" and s.defect_type == "good" and s.split == "test"
    assert not s.has_mask and not s.is_anomalous
    s2 = Sample("b.png", "b_mask.png", 1, "Class1", "scratch", "test", extra_masks=("b2.png",))
    assert s2.mask_paths() == ["b_mask.png", "b2.png"]
    assert Sample.from_dict(s2.to_dict()) == s2
    with pytest.raises(ValueError, match="label must be"):
        Sample("c.png", None, 2)


def test_truncated_files_raise(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".tif", "TIFF")):
        full = tmp_path / f"full{ext}"
        Image.fromarray(rgb).save(full, format=fmt)
        cut = tmp_path / f"cut{ext}"
        data = full.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError, match=f"cut\\{ext}"):
            load_image(cut)


def test_crafted_huge_header_refused_before_decoding(tmp_path: Path) -> None:
    """A PNG whose header claims 40000 x 40000 pixels is refused from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def bomb(name: str, w: int, h: int) -> Path:
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        idat = zlib.compress(b"\x00" * 1000)
        p = tmp_path / name
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
        return p

    # 144 megapixels: over our limit, under Pillow's own bomb limit
    with pytest.raises(ImageReadError, match=r"mid\.png.*12000x12000 = 144\.0 megapixels.*limit of 100"):
        load_image(bomb("mid.png", 12000, 12000))
    p = bomb("bomb.png", 40000, 40000)
    with pytest.raises(ImageReadError, match=r"bomb\.png.*limit of 100 megapixels.*decompression bomb"):
        load_image(p)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red, right half blue
    rgb[:, 20:] = (0, 0, 255)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # camera held rotated: viewers turn it 90 degrees clockwise
    p = tmp_path / "phone.jpg"
    im.save(p, quality=95, exif=exif.tobytes())
    a = load_image(p)
    assert a.shape == (40, 20, 3)  # upright: portrait
    # rotated clockwise: the left (red) half is now on top
    assert a[5, 10, 0] > 0.8 and a[5, 10, 2] < 0.2
    assert a[35, 10, 2] > 0.8 and a[35, 10, 0] < 0.2
