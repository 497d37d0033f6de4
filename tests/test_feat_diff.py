"""feat-diff: diffusion in the bank's feature space (ccad/methods/feat_diff.py).

Unit checks of its equations (LafitE-style editing, the DDIM reconstruction through diffusers'
scheduler, the two distances), then a tiny end-to-end run through the API and the CLI: train,
hyper-parameters picked on the held-out good slice, save, load, predict, evaluate.
"""
import json

import pytest
import torch
from torch import nn

from ccad.config import ConfigError
from ccad.features import FeatureBank
from ccad.methods import Context, get_method, method_names
from ccad.methods.feat_diff import FeatDiffConfig, distance_map, edit_features, search_pairs
from ccad.models.latent_denoiser import BankProjector


def test_registered_multi_class_and_listed_for_the_app():
    assert "feat-diff" in method_names()
    m = get_method("feat-diff")
    assert m.multi_class and m.trainable and m.space == "feature"
    from app.forms import trainable_variants

    assert "feat-diff" in [n for n, _ in trainable_variants()]


def test_edit_is_a_convex_step_to_the_nearest_memory_row():
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(7, 5, generator=g)
    z = torch.randn(2, 5, 3, 4, generator=g)
    q = z.permute(0, 2, 3, 1).reshape(-1, 5)
    nn_rows = memory[torch.cdist(q, memory).argmin(1)].view(2, 3, 4, 5).permute(0, 3, 1, 2)
    for lam in (0.0, 0.3, 1.0):
        z_e, near = edit_features(z, memory, lam)
        torch.testing.assert_close(z_e, (1 - lam) * z + lam * nn_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(near, nn_rows, rtol=1e-5, atol=1e-6)


def test_distances_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # two locations
    z_hat = torch.tensor([[1.0, 1.0], [0.0, -2.0]]).T.reshape(1, 2, 1, 2)
    l2 = distance_map(z, z_hat, "l2")
    cos = distance_map(z, z_hat, "cosine")
    torch.testing.assert_close(l2.flatten(), torch.tensor([1.0, 4.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos.flatten(), torch.tensor([1 - 1 / 2 ** 0.5, 2.0]), rtol=1e-5, atol=1e-6)


def test_schedule_pairs_and_bad_settings_name_the_field():
    assert search_pairs(1000, (50, 300), (1, 2)) == [(50, 1), (50, 2)]  # 300 / 1 and 300 / 2 do not divide T
    with pytest.raises(ConfigError, match="noise_level"):
        FeatDiffConfig(noise_level=300, steps=1).validate()
    with pytest.raises(ConfigError, match="method.edit"):
        FeatDiffConfig(edit=1.5).validate()
    with pytest.raises(ConfigError, match="method.distance"):
        FeatDiffConfig(distance="l1").validate()


class _Oracle(nn.Module):
    """Predicts exactly the method's fixed noise field: DDIM must then return the edited input."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, z_t, t, ctx):
        return self.method._noise_field(z_t.shape[1:], z_t.device).expand_as(z_t)


def _method(distance="l2", edit=1.0):
    cfg = FeatDiffConfig(preset="tiny", noise_level=100, steps=2, edit=edit, distance=distance,
                         feature_scale=1.0, feature_shift=0.0)
    bank = FeatureBank(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
    m = get_method("feat-diff")(cfg, Context(image_size=64, device=torch.device("cpu"), bank=bank))
    m.modules["denoiser"] = _Oracle(m)
    m.modules["bank_proj"] = BankProjector(6, 8)
    return m


@pytest.mark.parametrize("noise_level,steps", [(50, 1), (100, 2), (400, 4)])
def test_ddim_with_a_perfect_denoiser_returns_the_edited_features(noise_level, steps):
    m = _method()
    z_e = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m.denoise(z_e, noise_level, steps), z_e, rtol=1e-4, atol=1e-4)


def test_with_full_editing_the_map_is_the_distance_to_normal_and_peaks_on_a_planted_cell():
    m = _method(edit=1.0)
    g = torch.Generator().manual_seed(3)
    m.memory = torch.randn(32, 6, generator=g)
    z = m.memory[torch.randint(32, (1, 4, 4), generator=g)].permute(0, 3, 1, 2).clone()  # all cells normal
    z[0, :, 1, 2] += 6.0  # one anomalous cell far from every memory row
    raw = m.raw_maps(z, 100, 2, 1.0)
    assert raw.shape == (1, 1, 4, 4)
    assert int(raw.flatten().argmax()) == 1 * 4 + 2
    assert float(raw.flatten().sort().values[-2]) < 1e-3  # normal cells: reconstructed to themselves
    no_edit = m.raw_maps(z, 100, 2, 0.0)  # the perfect denoiser copies the anomaly back: nothing found
    assert float(no_edit.max()) < 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ccad.data.detect import load_dataset
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import train_detector
    from ccad.training import TrainConfig

    root = tmp_path_factory.mktemp("fd")
    data = write_dataset(root / "data", kinds=("granular", "fibrous"), n_train=5, n_test_good=1, n_test_defect=1,
                         size=64, seed=0)
    train = load_dataset(str(data), split="train")
    cfg = FeatDiffConfig(preset="tiny", memory_size=64, search_noise=(50, 100), search_steps=(1,),
                         search_edit=(0.0, 1.0), search_images=4)
    det = train_detector(train, root / "run", variant="feat-diff", method=cfg, image_size=64, bank_size=16,
                         train=TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, show_progress=False),
                         calibration_fraction=0.3)
    return det, data, root


def test_trained_detector_picks_settings_on_the_held_out_slice_and_round_trips(trained):
    from ccad.pipeline import AnomalyDetector

    det, data, root = trained
    table = det.method.search_table
    assert table["source"].startswith("synthetic anomalies on held-out good images (the selection part)")
    split = det.info["calibration_split"]
    # the search saw the selection part only; the threshold rests on the other, disjoint part
    assert table["n_good"] == min(4, split["selection"]) and table["n_synthetic"] == table["n_good"]
    assert det.info["n_calibration_images"] == split["threshold"] >= 1
    assert not set(split["selection_images"]) & set(split["threshold_images"])
    assert len(table["grid"]) == 5  # (50, 1), (100, 1) x edit 0, 1, and the identity arm at edit 1
    m, c = det.method, det.method.config
    chosen = table["chosen"]
    assert m.uses_identity() == (chosen["denoiser"] == "identity") and m.setting("edit") == chosen["edit"]
    if not m.uses_identity():
        assert (m.setting("noise_level"), m.setting("steps")) == (chosen["noise_level"], chosen["steps"])
    # fitted state, not the user's config: the config keeps what was given (None = searched)
    assert (c.noise_level, c.steps, c.edit, c.identity) == (None, None, None, False)
    assert set(det.card()["reconstruction"]["sources"].values()) == {"search (fitted state)"}
    assert (root / "run" / "features" / "latents.json").is_file()  # features cached once in the run
    det.save_pretrained(root / "saved")
    saved = json.loads((root / "saved" / "config.json").read_text())["method"]
    assert (saved["noise_level"], saved["steps"], saved["edit"]) == (None, None, None)
    fitted = json.loads((root / "saved" / "feat_diff_fitted.json").read_text())
    assert (fitted["noise_level"], fitted["steps"], fitted["edit"]) == tuple(m.setting(k) for k in
                                                                            ("noise_level", "steps", "edit"))
    assert bool(fitted.get("identity")) == m.uses_identity()
    again = AnomalyDetector.from_pretrained(root / "saved")
    assert again.method.setting("noise_level") == m.setting("noise_level") and again.method.search_table == table
    assert again.method.uses_identity() == m.uses_identity()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(again.maps_for_batch(x)[0], det.maps_for_batch(x)[0], rtol=1e-5, atol=1e-6)
    one = det.maps_for_batch(x[:1])[0]  # a prediction does not depend on the batch it is in
    torch.testing.assert_close(one, det.maps_for_batch(x)[0][:1], rtol=1e-4, atol=1e-5)


def test_a_model_saved_with_the_chosen_values_in_its_config_still_loads(trained):
    """Models saved before the fitted state existed had the search's values written into config.json
    and no feat_diff_fitted.json: they load and score the same, and the card says where the values came from."""
    import shutil

    from ccad.pipeline import AnomalyDetector

    det, data, root = trained
    old = root / "old"
    if not (root / "saved").is_dir():
        det.save_pretrained(root / "saved")
    shutil.copytree(root / "saved", old)
    chosen = {k: det.method.setting(k) for k in ("noise_level", "steps", "edit")}
    cfg = json.loads((old / "config.json").read_text())
    cfg["method"].update(chosen, identity=det.method.uses_identity())  # an older ccad set identity too
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "feat_diff_fitted.json").unlink()
    back = AnomalyDetector.from_pretrained(old)
    assert {k: back.method.setting(k) for k in chosen} == chosen
    assert set(back.card()["reconstruction"]["sources"].values()) == {
        "search (written into config.json by an older ccad)"}
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(back.maps_for_batch(x)[0], det.maps_for_batch(x)[0], rtol=1e-5, atol=1e-6)


def test_values_the_user_set_are_never_replaced_by_the_search(tmp_path):
    from ccad.data.detect import load_dataset
    from ccad.data.synthetic import write_dataset
    from ccad.pipeline import train_detector
    from ccad.training import TrainConfig

    data = write_dataset(tmp_path / "data", kinds=("granular",), n_train=8, n_test_good=1, n_test_defect=1,
                         size=64, seed=2)
    cfg = FeatDiffConfig(preset="tiny", memory_size=32, noise_level=100, edit=0.5, search_noise=(50, 100),
                         search_steps=(1, 2), search_edit=(0.0, 1.0), search_images=4)
    det = train_detector(load_dataset(str(data), split="train"), tmp_path / "run", variant="feat-diff", method=cfg,
                         image_size=64, bank_size=16, calibration_fraction=0.5,
                         train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, show_progress=False))
    m = det.method
    table = m.search_table
    # only steps was left to the search: the grid holds the user's noise level and edit, nothing else
    assert table["searched"] == ["steps"]
    trained = [r for r in table["grid"] if r["denoiser"] == "trained"]
    assert {(r["noise_level"], r["edit"]) for r in trained} == {(100, 0.5)}
    assert {r["steps"] for r in trained} == {1, 2}
    assert [r["edit"] for r in table["grid"] if r["denoiser"] == "identity"] == [0.5]  # the identity arm, same edit
    assert (m.config.noise_level, m.config.edit, m.config.steps) == (100, 0.5, None)
    assert (m.setting("noise_level"), m.setting("edit")) == (100, 0.5)
    best_trained = max(trained, key=lambda r: (r["objective"], -r["steps"]))
    assert m.setting("steps") == best_trained["steps"]
    src = det.card()["reconstruction"]["sources"]
    assert src == {"noise_level": "config (as given)", "steps": "search (fitted state)", "edit": "config (as given)"}
    # every value set: nothing is searched, nothing is chosen on held-out images
    full = FeatDiffConfig(preset="tiny", noise_level=100, steps=2, edit=0.5)
    assert full.searched() == []
    # a set value the search grid cannot pair with is refused with a message
    with pytest.raises(ConfigError, match="noise_level / method.steps"):
        FeatDiffConfig(noise_level=300, search_steps=(1, 2)).validate()


def test_feat_diff_through_the_cli(tmp_path, capsys):
    from ccad.cli import main
    from ccad.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", kinds=("granular",), n_train=10, n_test_good=1, n_test_defect=1,
                         size=64, seed=1)
    run = tmp_path / "run"
    assert main(["train", str(data / "granular"), "--variant", "feat-diff", "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--image-size", "64", "--preset", "tiny", "--option", "memory_size=32",
                 "--option", "search_noise=50", "--option", "search_steps=1", "--option", "search_edit=1.0",
                 "--option", "distance=cosine", "--quiet"]) == 0
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["variant"] == "feat-diff" and cfg["method"]["distance"] == "cosine"
    assert cfg["method"]["noise_level"] is None and cfg["method"]["edit"] is None  # searched: fitted state
    fitted = json.loads((run / "model" / "feat_diff_fitted.json").read_text())
    assert fitted["noise_level"] == 50 and fitted["edit"] == 1.0
    capsys.readouterr()
    assert main(["evaluate", str(run / "model"), str(data / "granular"), "--quiet"]) == 0
    assert "image_auroc" in capsys.readouterr().out


def test_the_card_states_the_denoisers_measured_share_from_the_search() -> None:
    from ccad.methods.feat_diff import denoiser_share

    def grid(trained: float, identity: float) -> dict:
        return {"grid": [{"denoiser": "trained", "objective": trained - 0.1},
                         {"denoiser": "trained", "objective": trained},
                         {"denoiser": "identity", "objective": identity}]}

    tiny = denoiser_share(grid(0.81728, 0.81718))  # run A's MTD model: a margin of 0.0001
    assert tiny["margin"] == 0.0001 and "within the noise" in tiny["note"]
    assert "added nothing" in denoiser_share(grid(0.8, 0.8))["note"]
    clear = denoiser_share(grid(0.85, 0.80))
    assert clear["margin"] == 0.05 and "within the noise" not in clear["note"]
    assert denoiser_share({"grid": [{"denoiser": "trained", "objective": 0.8}]}) is None  # no identity arm
    assert denoiser_share(None) is None


class _RandomEps(nn.Module):
    """A fixed random 'network' whose prediction depends on z_t and t (so every DDIM step matters)."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c, generator=torch.Generator().manual_seed(7)) / c ** 0.5)

    def forward(self, z_t, t, ctx):
        return torch.einsum("dc,bchw->bdhw", self.w, z_t) * (1.0 + t.float().view(-1, 1, 1, 1) / 1000.0)


@pytest.mark.parametrize("noise_level,steps", [(50, 1), (100, 2), (400, 4)])
def test_reconstruction_is_the_shared_samplers_partial_ddim_with_per_image_generators(noise_level, steps):
    """feat-diff reconstructs on the package's one sampler: its result is partial_ddim's (DDIM from the
    features noised to noise_level, each image's noise from its own generator seeded with ``seed``),
    and an image's reconstruction is the one it gets alone."""
    from ccad.diffusion.objectives import image_generators
    from ccad.diffusion.sampling import partial_ddim

    m = _method()
    m.config.seed = 3
    m.modules["denoiser"] = _RandomEps(6)
    z_e = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    got = m.denoise(z_e, noise_level, steps)
    want = partial_ddim(m._eps_fn(m.modules, z_e.device), z_e, m.scheduler, noise_level, steps,
                        generator=image_generators(3, 3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - z_e).abs().max()) > 1e-2  # the random network really changed the features
    torch.testing.assert_close(m.denoise(z_e[1:2], noise_level, steps), got[1:2], rtol=1e-4, atol=1e-5)


def test_denoiser_presets_come_from_the_one_preset_table():
    from ccad.models.feat_denoiser import build_feat_denoiser
    from ccad.models.presets import PRESET_NAMES, unet_preset

    for name in PRESET_NAMES:  # every preset name a user can pass builds, with the table's row
        net = build_feat_denoiser(name, 12)
        row = unet_preset("feat", name)
        assert {k: net.config[k] for k in row} == row and net.config["in_channels"] == 12
    with pytest.raises(ValueError, match="tiny"):
        build_feat_denoiser("huge", 12)


class _Cache:
    """A feature cache as feat-diff reads it: ``latents`` (N x C x h x w, float16) and ``len``."""

    def __init__(self, latents):
        self.latents = latents

    def __len__(self):
        return len(self.latents)


def test_bank_and_edit_memory_are_selected_in_bounded_memory_and_cover_the_cells():
    """The bank and the edit memory come from one streamed pass over the cache: the coresets never
    hold more than their buffer however many cells stream past, and the streamed memory covers every
    cell nearly as well as the one-shot greedy over all of them."""
    import numpy as np

    from ccad.features.coreset import covering_radius, greedy_coreset
    from ccad.methods.feat_diff import select_cells

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 8, generator=g) * 4
    n, side = 400, 8  # 400 maps of 8 x 8 cells: 25600 cells, many buffers' worth
    which = torch.randint(40, (n, side, side), generator=g)
    z = (centres[which] + 0.3 * torch.randn(n, side, side, 8, generator=g)).permute(0, 3, 1, 2)
    cache = _Cache(z.numpy().astype(np.float16))
    bank, memory = select_cells(cache, 0, [(16, 0), (48, 1)], chunk=64, one_shot_bytes=0)  # force streaming
    cells = torch.from_numpy(cache.latents.astype(np.float32)).permute(0, 2, 3, 1).reshape(-1, 8)
    assert bank.seen == memory.seen == cells.shape[0]
    for core in (bank, memory):
        assert core.reductions > 0 and core.peak <= core.buffer < cells.shape[0] // 10
    rows = memory.result()
    assert rows.shape == (48, 8)
    streamed = covering_radius(cells, rows)
    one_shot = covering_radius(cells, cells[greedy_coreset(cells, 48, seed=1)])
    assert streamed <= 1.5 * one_shot
    # every row is a cached cell (selected, never averaged)
    assert float(torch.cdist(rows, cells).min(1).values.max()) < 1e-4
    # patches_per_image draws that many cells of every map
    few = select_cells(cache, 5, [(16, 0)], one_shot_bytes=0)[0]
    assert few.seen == 5 * n
    # under the budget (the default, 512 MB) the same cells are selected one-shot: exactly the
    # greedy coreset of every cell, the selection models had before streaming existed
    small = select_cells(cache, 0, [(48, 1)])[0]
    assert small.seen == cells.shape[0]
    torch.testing.assert_close(small.result(), cells[greedy_coreset(cells, 48, seed=1)])
    # a transform (per-channel standardisation) is applied before selection
    halved = select_cells(cache, 0, [(48, 1)], transform=lambda r: 0.5 * r)[0].result()
    torch.testing.assert_close(halved, 0.5 * small.result())
