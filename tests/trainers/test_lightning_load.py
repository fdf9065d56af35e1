"""Our stripped Lightning checkpoints load in Lightning itself, as its own weights-only saves do.

Needs the dev-only `trainers` extra (`pip install -e '.[trainers]'`); skips without it, and without
the shared corpus. The module below matches the corpus run's layers and hyper-parameters; it has no
defaults, so `load_from_checkpoint` can only build it from the hyper-parameters the file kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_watchd.engine import safeload
from ckpt_watchd.worker import StripJob, run_job

# ImportError too: an install that no longer imports beside this torch skips, with its reason
pl = pytest.importorskip("lightning.pytorch", exc_type=ImportError)

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
INT, FIN, REF = (f"lightning/{run}/lightning_logs/version_0/checkpoints"
                 for run in ("interrupted", "finished", "reference"))
# a fat checkpoint, and the trainer's weights-only save of the same training state
CASES = [
    (f"{INT}/epoch=0-step=3.ckpt", f"{REF}/epoch=0-step=3.ckpt"),
    (f"{INT}/last.ckpt", f"{REF}/epoch=1-step=6.ckpt"),  # written at epoch 1
    (f"{FIN}/last.ckpt", f"{REF}/last.ckpt"),
]


class TinyClassifier(pl.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self, in_dim: int, hidden: int, num_classes: int, lr: float, weight_decay: float,
                 gamma: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.BatchNorm1d(hidden), nn.Linear(hidden, num_classes))


def corpus_file(rel: str) -> Path:
    path = CORPUS / rel
    if not path.is_file():
        pytest.skip(f"corpus file missing: {rel}")
    return path


@pytest.mark.parametrize(("src", "ref"), CASES, ids=["epoch0", "interrupted-last", "finished-last"])
def test_stripped_checkpoint_loads_with_load_from_checkpoint(tmp_path: Path, src: str, ref: str) -> None:
    """LightningModule.load_from_checkpoint builds the module from our file: the reference's weights."""
    path = tmp_path / "model.ckpt"
    shutil.copyfile(corpus_file(src), path)
    assert run_job(StripJob(path=str(path))).status == "stripped"
    expected = safeload.load(corpus_file(ref)).obj
    model = TinyClassifier.load_from_checkpoint(path, map_location="cpu")  # strict: every key
    assert dict(model.hparams) == expected["hyper_parameters"]
    state = model.state_dict()
    assert list(state) == list(expected["state_dict"])
    for name, tensor in expected["state_dict"].items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_stripped_checkpoint_loads_with_torchs_weights_only_default(tmp_path: Path) -> None:
    """Like Lightning's own weights-only file, ours loads under torch.load's weights_only=True."""
    path = tmp_path / "last.ckpt"
    shutil.copyfile(corpus_file(CASES[1][0]), path)
    assert run_job(StripJob(path=str(path))).status == "stripped"
    ours = torch.load(path, map_location="cpu", weights_only=True)
    theirs = torch.load(corpus_file(CASES[1][1]), map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    assert ours["loops"] == theirs["loops"] and ours["epoch"] == theirs["epoch"] == 1
