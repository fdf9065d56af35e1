"""A checkpoint-N/ we stripped resumes in transformers' own Trainer like a `save_only_model` one.

Needs the dev-only `trainers` extra (`pip install -e '.[trainers]'`); skips without it. A tiny
GPT-2 (2 layers, as the corpus run) trains 2 steps with save_steps=1 on CPU, twice: once with the
full checkpoint and once with `save_only_model=True`. The stripped folder must hold what the
weights-only save holds, and `train(resume_from_checkpoint=...)` must run from it with a fresh
optimizer (transformers loads optimizer.pt and scheduler.pt only when both are there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_watchd.engine import folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
safetensors_torch = pytest.importorskip("safetensors.torch")


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 8, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class OptimizerAtStart(transformers.TrainerCallback):  # type: ignore[misc]
    """Records how much optimizer state the Trainer had when training (re)started."""

    def __init__(self) -> None:
        self.state_entries: int | None = None
        self.start_step: int | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.state_entries = len(kw["optimizer"].state)
        self.start_step = state.global_step
        self.weights = {k: v.detach().clone() for k, v in kw["model"].state_dict().items()}


def trainer(out: Path, *, max_steps: int, save_only_model: bool = False,
            callbacks: list[Any] | None = None) -> Any:
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=1,
        save_only_model=save_only_model, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                callbacks=callbacks or [])


def test_stripped_checkpoint_resumes_with_a_fresh_optimizer(tmp_path: Path) -> None:
    """Stripped = save_only_model's files and weights; resuming runs on with no optimizer state."""
    trainer(tmp_path / "full", max_steps=2).train()
    trainer(tmp_path / "weights", max_steps=2, save_only_model=True).train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file()  # what the strip is for

    o = folder.strip_folder(ckpt, profile="transformers")
    assert o.status == "stripped", o
    ref = tmp_path / "weights" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in ref.iterdir())
    ours = safetensors_torch.load_file(ckpt / "model.safetensors")
    theirs = safetensors_torch.load_file(ref / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    seen = OptimizerAtStart()
    resumed = trainer(tmp_path / "full", max_steps=3, callbacks=[seen])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert (seen.start_step, seen.state_entries) == (2, 0)  # a fresh optimizer, from step 2
    assert all(torch.equal(seen.weights[k], ours[k]) for k in ours)  # the checkpoint's weights
    assert resumed.state.global_step == 3

    control = OptimizerAtStart()  # the unstripped checkpoint does bring its optimizer back
    trainer(tmp_path / "full", max_steps=3, callbacks=[control]).train(
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    assert control.start_step == 1 and control.state_entries
