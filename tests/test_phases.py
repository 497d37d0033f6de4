"""Long work that talks (issue 24 item 1): every phase of a ``ccad train`` run announces itself on
stderr with the time since the start, and the previous phase says how long it took; the phases
with counts (bank features, training, the fusion fit) show a bar."""
from __future__ import annotations

import re

from ccad.cli import main
from ccad.data.synthetic import write_dataset


def test_every_phase_of_a_feat_diff_run_announces_itself(tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "data", kinds=("granular",), n_train=6, n_test_good=1, n_test_defect=1,
                         size=64, seed=1)
    assert main(["train", str(data / "granular"), "--variant", "feat-diff", "--out", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "2", "--image-size", "64", "--preset", "tiny",
                 "--option", "memory_size=32", "--option", "search_noise=50", "--option", "search_steps=1",
                 "--option", "search_edit=1.0", "--scoring", "fusion=bank"]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    announced = re.findall(r"^\[\d+:\d\d\] (\S.*)$", err, flags=re.M)
    expected = ["building the feature bank", "building the model", "caching the backbone features",
                "training", "choosing noise level, steps and edit strength: 1 settings scored on",
                "fitting the bank map", "calibrating the threshold on", "saving the model"]
    starts = [next((i for i, line in enumerate(announced) if line.startswith(e)), None) for e in expected]
    assert None not in starts and starts == sorted(starts), announced  # each phase, in the order it runs
    assert len(re.findall(r"^\[\d+:\d\d\]   done in \d+\.\d s$", err, flags=re.M)) == len(announced)
    for bar in ("building the feature bank:", "train:", "fitting the bank map it is fused with:"):
        assert re.search(rf"^{re.escape(bar)}\s+\d+%", err, flags=re.M), bar
