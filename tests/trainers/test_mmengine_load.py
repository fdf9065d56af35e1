"""Our stripped MMEngine checkpoints load with MMEngine's own `load_checkpoint`, as its saves do.

Needs the dev-only `trainers` extra (`pip install -e '.[trainers]'`); skips without it, and without
the shared corpus. MMEngine 0.10.7 calls `torch.load` without `weights_only`, and torch >= 2.6
refuses its checkpoints by default (the `getattr(HistoryBuffer, 'min')` of the message hub): the
trainer's own files and ours alike. The load test sets torch's documented escape hatch,
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, as a user of MMEngine on this torch must.
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ckpt_watchd.engine import safeload
from ckpt_watchd.worker import StripJob, run_job

with warnings.catch_warnings():
    # mmengine.optim imports torch.distributed.optim, whose torch.jit.script torch deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    # ImportError too: an install that no longer imports beside this torch skips, with its reason
    mm_runner = pytest.importorskip("mmengine.runner", exc_type=ImportError)
    mm_history = pytest.importorskip("mmengine.logging.history_buffer", exc_type=ImportError)

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
WORK = "mmengine/{}/work_dirs/tiny_mlp"
CASES = [(WORK.format(run) + f"/epoch_{e}.pth", WORK.format("reference") + f"/epoch_{e}.pth")
         for run, e in (("interrupted", 2), ("finished", 4))]


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 320), nn.ReLU(), nn.Linear(320, 320), nn.ReLU(),
                                 nn.BatchNorm1d(320), nn.Linear(320, 10))


def corpus_file(rel: str) -> Path:
    path = CORPUS / rel
    if not path.is_file():
        pytest.skip(f"corpus file missing: {rel}")
    return path


def stripped_copy(tmp_path: Path, src: str) -> Path:
    path = tmp_path / Path(src).name
    shutil.copyfile(corpus_file(src), path)
    assert run_job(StripJob(path=str(path))).status == "stripped"
    return path


@pytest.mark.parametrize(("src", "ref"), CASES, ids=["interrupted-epoch2", "finished-epoch4"])
def test_stripped_checkpoint_loads_with_load_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        src: str, ref: str) -> None:
    """mmengine.runner.load_checkpoint fills a matching module with the reference's weights."""
    path = stripped_copy(tmp_path, src)
    expected = safeload.load(corpus_file(ref)).obj
    model = TinyMLP()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        ckpt = mm_runner.load_checkpoint(model, str(path), map_location="cpu", strict=True)
    assert list(ckpt) == ["meta", "state_dict", "message_hub"]
    assert ckpt["meta"]["epoch"] == expected["meta"]["epoch"]
    state = model.state_dict()
    assert list(state) == list(expected["state_dict"])
    for name, tensor in expected["state_dict"].items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    # the message hub's buffers come back as the real class; `__setstate__` merges the pickled
    # `getattr(HistoryBuffer, name)` methods into the class's table, so they must be the real ones
    loss = ckpt["message_hub"]["log_scalars"]["train/loss"]
    history = mm_history.HistoryBuffer
    assert type(loss) is history
    assert history._statistics_methods == {name: getattr(history, name)
                                           for name in ("min", "max", "current", "mean")}
    ref_loss = expected["message_hub"]["log_scalars"]["train/loss"].__dict__["_log_history"]
    assert np.array_equal(loss.data[0], ref_loss) and loss.min() == ref_loss.min()


def test_torchs_weights_only_default_refuses_ours_and_the_trainers_alike(tmp_path: Path) -> None:
    """Without the escape hatch MMEngine cannot load its own file either: the refusal is not ours."""
    ours = stripped_copy(tmp_path, CASES[0][0])
    for path in (ours, corpus_file(CASES[0][1])):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            mm_runner.load_checkpoint(TinyMLP(), str(path), map_location="cpu")
