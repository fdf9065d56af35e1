"""Folder strips (transformers `checkpoint-N/`, accelerate `save_state` folders): what goes, what
stays byte-identical, what a kill mid-save leaves, archive and restore, and the journal under kill -9.

The corpus cases skip without `../shared`; the generated folders (torch.save zips and a
safetensors file written by hand) make the suite stand alone. The crash tests fork a child that
stops itself (SIGSTOP) before its k-th disk operation, through `folder.STEP_HOOK`; the parent
SIGKILLs it there, replays the journal, and checks the folder is the trainer's or fully stripped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import torch

from ckpt_watchd.engine import folder as folders
from ckpt_watchd.engine.profiles import accelerate, common, registry, transformers
from ckpt_watchd.errors import NotARegularFile, SourceChanged, Unsupported
from ckpt_watchd.records.archive import read_manifest, restore

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
OWN = ".ckpt-watchd-"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus is not here")

Snapshot = dict[str, bytes]


# ------------------------------------------------------------------------------ helpers


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A minimal safetensors file, by hand: 8-byte header length, JSON header, raw data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data, offset = b"", 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, bytes), read from the header: compares weights across saves."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def make_transformers(path: Path, step: int = 3, *, ranks: int = 1, scaler: bool = True) -> Path:
    """A Trainer checkpoint folder, the files its _save_checkpoint writes (tiny)."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(step)
    w = {"h.0.weight": torch.randn(8, 8, generator=g), "h.0.bias": torch.randn(8, generator=g)}
    (path / "model.safetensors").write_bytes(safetensors_bytes(w))
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    torch.save({"output_dir": "out", "save_steps": 1}, path / "training_args.bin")
    torch.save({"state": {0: {"exp_avg": torch.zeros(8, 8)}}, "param_groups": []},
               path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    if scaler:
        torch.save({"scale": 65536.0}, path / "scaler.pt")
    for r in range(ranks):
        torch.save({"cpu": torch.zeros(16, dtype=torch.uint8)},
                   path / ("rng_state.pth" if ranks == 1 else f"rng_state_{r}.pth"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def make_accelerate(path: Path, *, models: int = 1, optimizers: int = 1, ranks: int = 1) -> Path:
    """An accelerate save_state folder (tiny), with a registered custom object."""
    path.mkdir(parents=True)
    for i in range(models):
        w = {"fc.weight": torch.full((4, 4), float(i))}
        (path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")).write_bytes(
            safetensors_bytes(w))
    for i in range(optimizers):
        torch.save({"state": {}, "param_groups": [{"lr": 0.1}]},
                   path / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin"))
        torch.save({"last_epoch": 1}, path / ("scheduler.bin" if i == 0 else f"scheduler_{i}.bin"))
    torch.save({"epoch": 0}, path / "sampler.bin")
    for r in range(ranks):
        torch.save({"step": 1, "torch_manual_seed": torch.zeros(8, dtype=torch.uint8)},
                   path / f"random_states_{r}.pkl")
    torch.save({"ema": torch.ones(4)}, path / "custom_checkpoint_0.pkl")
    return path


def copy_folder(src: Path, dest: Path) -> Path:
    """A writable copy (the corpus is read-only)."""
    shutil.copytree(src, dest, copy_function=shutil.copyfile)
    for d in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)
    return dest


def snapshot(path: Path) -> Snapshot:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def identity(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, size, mtime_ns) of every entry: "untouched" means all of these equal."""
    out = {}
    for p in path.iterdir():
        st = os.lstat(p)
        out[p.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def own_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(OWN))


# ------------------------------------------------------------------------------ the corpus


@needs_corpus
@pytest.mark.parametrize("step", [1, 2])
def test_transformers_corpus_strip_is_save_only_model(tmp_path: Path, step: int) -> None:
    """A corpus checkpoint-N stripped has the reference's files; kept ones are the checkpoint's bytes."""
    src = CORPUS / "transformers" / "interrupted" / f"checkpoint-{step}"
    ref = CORPUS / "transformers" / "reference" / f"checkpoint-{step}"
    ckpt = copy_folder(src, tmp_path / "out" / f"checkpoint-{step}")
    before = snapshot(ckpt)
    o = folders.strip_folder(ckpt, profile="transformers")
    assert (o.status, o.profile, o.reason) == ("stripped", "transformers", None)
    after = snapshot(ckpt)
    assert sorted(after) == sorted(p.name for p in ref.iterdir())
    assert all(after[n] == before[n] for n in after)
    assert (o.bytes_before, o.bytes_after) == (sum(map(len, before.values())),
                                                sum(map(len, after.values())))
    # the reference is a second run with save_only_model=True: its weights, configs and state
    # are these bytes, but its training_args.bin pickles other arguments (save_only_model)
    for name in after:
        if name != "training_args.bin":
            assert after[name] == (ref / name).read_bytes(), name
    assert after["training_args.bin"] != (ref / "training_args.bin").read_bytes()
    assert safetensors_tensors(ckpt / "model.safetensors") == \
        safetensors_tensors(ref / "model.safetensors")
    assert own_names(ckpt) == []


@needs_corpus
@pytest.mark.parametrize("step", [1, 2])
def test_accelerate_corpus_strip_is_save_model(tmp_path: Path, step: int) -> None:
    """A corpus step_N stripped is save_model's folder plus the custom checkpoint, kept and reported."""
    src = CORPUS / "accelerate" / "interrupted" / f"step_{step}"
    ref = CORPUS / "accelerate" / "reference" / f"step_{step}"
    state = copy_folder(src, tmp_path / "run" / f"step_{step}")
    before = snapshot(state)
    o = folders.strip_folder(state, profile="accelerate")
    assert o.status == "stripped"
    assert o.reason == "kept, of unknown purpose: custom_checkpoint_0.pkl"
    after = snapshot(state)
    assert sorted(after) == sorted([p.name for p in ref.iterdir()] + ["custom_checkpoint_0.pkl"])
    assert all(after[n] == before[n] for n in after)
    # the corpus checked the reference's tensors equal the checkpoint's; the headers agree too,
    # so the files are byte-identical (compared by tensor as well, which is what must hold)
    assert after["model.safetensors"] == (ref / "model.safetensors").read_bytes()
    assert safetensors_tensors(state / "model.safetensors") == \
        safetensors_tensors(ref / "model.safetensors")
    assert o.bytes_after == sum(map(len, after.values()))


@needs_corpus
def test_transformers_kill_mid_save_is_left_untouched(tmp_path: Path) -> None:
    """checkpoint-3 with a complete model, a 0-byte optimizer.pt and no trainer_state.json: incomplete."""
    src = CORPUS / "transformers" / "interrupted" / "checkpoint-2"
    ckpt = tmp_path / "out" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "generation_config.json", "training_args.bin"):
        shutil.copyfile(src / name, ckpt / name)
    (ckpt / "optimizer.pt").write_bytes(b"")
    before, ids = snapshot(ckpt), identity(ckpt)
    o = folders.strip_folder(ckpt, profile="transformers")
    assert o.status == "incomplete"
    assert o.reason is not None and "optimizer.pt is empty" in o.reason
    assert o.reason.endswith("left untouched") and "\n" not in o.reason
    assert (snapshot(ckpt), identity(ckpt)) == (before, ids)
    look = common.Look(PurePosixPath("out/checkpoint-3"), {n: False for n in before})
    assert transformers.discover(look) == common.Found("out", (), incomplete=("out/checkpoint-3",))


@needs_corpus
def test_accelerate_kill_mid_save_is_left_untouched(tmp_path: Path) -> None:
    """An accelerate folder whose optimizer.bin is 0 bytes is incomplete and left as it is."""
    state = copy_folder(CORPUS / "accelerate" / "interrupted" / "step_2", tmp_path / "run" / "step_3")
    (state / "optimizer.bin").write_bytes(b"")
    before, ids = snapshot(state), identity(state)
    o = folders.strip_folder(state, profile="accelerate")
    assert o.status == "incomplete"
    assert o.reason == ("incomplete: optimizer.bin is empty (0 bytes): a save that did not finish; "
                        "left untouched")
    assert (snapshot(state), identity(state)) == (before, ids)


def _corpus_or_skip(kind: str, sub: str) -> Callable[[Path], Path]:
    def make(dest: Path) -> Path:
        if not CORPUS.is_dir():
            pytest.skip("../shared/corpus is not here")
        return copy_folder(CORPUS / kind / "interrupted" / sub, dest)
    return make


@pytest.mark.parametrize(("make", "profile", "removed"), [
    (_corpus_or_skip("transformers", "checkpoint-2"), "transformers",
     ["optimizer.pt", "rng_state.pth", "scheduler.pt"]),
    (_corpus_or_skip("accelerate", "step_2"), "accelerate",
     ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]),
    (lambda p: make_transformers(p, ranks=2), "transformers",
     ["optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "scaler.pt", "scheduler.pt"]),
    (make_accelerate, "accelerate",
     ["optimizer.bin", "random_states_0.pkl", "sampler.bin", "scheduler.bin"]),
], ids=["corpus-transformers", "corpus-accelerate", "transformers", "accelerate"])
def test_archive_then_restore_folder(tmp_path: Path, make: Callable[[Path], Path], profile: str,
                                     removed: list[str]) -> None:
    """Every removed file is in the archive, and `restore FOLDER` puts the folder back byte-identical."""
    root = tmp_path / "root"
    ckpt = make(root / "out" / "checkpoint-2")
    before, mtime = snapshot(ckpt), os.stat(ckpt).st_mtime_ns
    arch = tmp_path / "archive"
    assert folders.strip_folder(ckpt, profile=profile, archive_dir=arch,
                                root=root).status == "stripped"
    entries = read_manifest(arch)
    assert sorted(Path(e["original"]).name for e in entries) == removed
    assert all(Path(e["archived"]).read_bytes() == before[Path(e["original"]).name] for e in entries)
    assert {e["folder"] for e in entries} == {str(ckpt.resolve())}
    assert restore(ckpt, arch) == 0
    assert snapshot(ckpt) == before
    assert os.stat(ckpt).st_mtime_ns == mtime
    assert own_names(ckpt) == []


# ------------------------------------------------------------------------------ generated folders


def test_generated_transformers_multi_process(tmp_path: Path) -> None:
    """Per-process rng_state_<rank>.pth and scaler.pt go too; every kept file keeps its bytes."""
    ckpt = make_transformers(tmp_path / "out" / "checkpoint-3", ranks=4)
    before = snapshot(ckpt)
    p = transformers.plan(ckpt)
    assert p.remove == ("optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "rng_state_2.pth",
                        "rng_state_3.pth", "scaler.pt", "scheduler.pt")
    assert p.keep == ("config.json", "generation_config.json", "model.safetensors",
                      "trainer_state.json", "training_args.bin")
    assert (p.unknown, p.incomplete, p.unsupported) == ((), None, None)
    o = folders.strip_folder(ckpt, profile="transformers")
    assert o.status == "stripped"
    assert snapshot(ckpt) == {n: before[n] for n in p.keep}


def test_generated_accelerate_multi(tmp_path: Path) -> None:
    """Second models/optimizers, samplers and ranks: optimizers last, model_1 kept, custom reported."""
    state = make_accelerate(tmp_path / "run" / "checkpoint_7", models=2, optimizers=2, ranks=2)
    before = snapshot(state)
    p = accelerate.plan(state)
    assert p.remove == ("random_states_0.pkl", "random_states_1.pkl", "sampler.bin", "scheduler.bin",
                        "scheduler_1.bin", "optimizer_1.bin", "optimizer.bin")
    assert p.keep == ("model.safetensors", "model_1.safetensors")
    assert p.unknown == ("custom_checkpoint_0.pkl",)
    o = folders.strip_folder(state, profile="accelerate")
    assert (o.status, o.reason) == ("stripped", "kept, of unknown purpose: custom_checkpoint_0.pkl")
    assert snapshot(state) == {n: before[n] for n in (*p.keep, *p.unknown)}


def test_profile_found_by_discovery_when_not_named(tmp_path: Path) -> None:
    """With no profile named (the `strip` command), the folder's discovery picks it."""
    ckpt = make_transformers(tmp_path / "checkpoint-5")
    state = make_accelerate(tmp_path / "step_2")
    assert folders.strip_folder(ckpt, profile="").profile == "transformers"
    assert folders.strip_folder(state, profile="").profile == "accelerate"


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize(("damage", "why"), [
    (lambda p: truncate(p / "optimizer.pt", 0.5), "optimizer.pt is not a complete torch zip (torn)"),
    (lambda p: truncate(p / "model.safetensors", 0.9), "model.safetensors holds"),
    (lambda p: truncate(p / "trainer_state.json", 0.5), "trainer_state.json does not parse as JSON"),
    (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda p: (p / "rng_state.pth").write_bytes(b""), "rng_state.pth is empty (0 bytes)"),
    (lambda p: (p / "checkpoint-is-incomplete.txt").write_text("saving"), "JIT checkpoint"),
    (lambda p: (p / "training_args.bin").write_bytes(b"PK\x03\x04"), "training_args.bin is not"),
])
def test_torn_transformers_files_make_it_incomplete(tmp_path: Path, damage: Callable[[Path], None],
                                                    why: str) -> None:
    """A torn or missing file of a Trainer checkpoint: incomplete, with why, and left untouched."""
    ckpt = make_transformers(tmp_path / "checkpoint-3")
    damage(ckpt)
    before, ids = snapshot(ckpt), identity(ckpt)
    o = folders.strip_folder(ckpt, profile="transformers")
    assert o.status == "incomplete"
    assert o.reason is not None and why in o.reason, o.reason
    assert (snapshot(ckpt), identity(ckpt)) == (before, ids)


@pytest.mark.parametrize(("damage", "why"), [
    (lambda p: truncate(p / "scheduler.bin", 0.3), "scheduler.bin is not a complete torch zip"),
    (lambda p: truncate(p / "model.safetensors", 0.99), "model.safetensors holds"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 16), "model.safetensors is torn"),
    (lambda p: (p / "random_states_0.pkl").unlink(), "no random_states_<rank>.pkl"),
])
def test_torn_accelerate_files_make_it_incomplete(tmp_path: Path, damage: Callable[[Path], None],
                                                  why: str) -> None:
    """A torn file to remove or model file of a state folder: incomplete, and left untouched."""
    state = make_accelerate(tmp_path / "step_3")
    damage(state)
    before, ids = snapshot(state), identity(state)
    o = folders.strip_folder(state, profile="accelerate")
    assert o.status == "incomplete"
    assert o.reason is not None and why in o.reason, o.reason
    assert (snapshot(state), identity(state)) == (before, ids)


def _deepspeed(p: Path) -> None:
    (p / "global_step3").mkdir()
    torch.save({"optimizer_state_dict": {}}, p / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (p / "latest").write_text("global_step3")
    (p / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")


def _fsdp(p: Path) -> None:
    (p / "pytorch_model_fsdp_0").mkdir()
    (p / "optimizer_0").mkdir()


def _no_weights(p: Path) -> None:
    (p / "model.safetensors").unlink()


def _acc_deepspeed(p: Path) -> None:
    (p / "pytorch_model").mkdir()
    (p / "latest").write_text("pytorch_model")


@pytest.mark.parametrize(("make", "damage", "what"), [
    (make_transformers, _deepspeed, "a DeepSpeed checkpoint"),
    (make_transformers, _fsdp, "an FSDP"),
    (make_transformers, _no_weights, "no model weights file"),
    (make_accelerate, _acc_deepspeed, "a DeepSpeed state folder"),
    (make_accelerate, _fsdp, "an FSDP"),
    (make_accelerate, _no_weights, "no model file"),
])
def test_unsupported_layouts_are_left_untouched(tmp_path: Path, make: Callable[[Path], Path],
                                                damage: Callable[[Path], None], what: str) -> None:
    """DeepSpeed, FSDP, or no weights beside the optimizer: not supported, nothing removed."""
    path = make(tmp_path / "checkpoint-3")
    damage(path)
    before, ids = snapshot(path), identity(path)
    profile = "transformers" if make is make_transformers else "accelerate"
    o = folders.strip_folder(path, profile=profile)
    assert o.status == "incomplete"
    assert o.reason is not None and o.reason.startswith("not supported: ")
    assert what in o.reason, o.reason
    assert (snapshot(path), identity(path)) == (before, ids)


def test_stripped_folder_is_skipped(tmp_path: Path) -> None:
    """A folder with nothing left to remove is skipped as already stripped, untouched."""
    ckpt = make_transformers(tmp_path / "checkpoint-3")
    folders.strip_folder(ckpt, profile="transformers")
    ids = identity(ckpt)
    o = folders.strip_folder(ckpt, profile="transformers")
    assert (o.status, o.reason) == ("skipped", "already stripped")
    assert o.bytes_before == o.bytes_after == sum(s for _, s, _ in ids.values())
    assert identity(ckpt) == ids


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    """A dry run says what the strip would save and writes nothing, not even a journal."""
    state = make_accelerate(tmp_path / "step_1")
    before, ids, mtime = snapshot(state), identity(state), os.stat(state).st_mtime_ns
    o = folders.strip_folder(state, profile="accelerate", dry_run=True)
    assert o.status == "would_strip"
    kept = ("model.safetensors", "custom_checkpoint_0.pkl")
    assert o.bytes_after == sum(len(before[n]) for n in kept)
    assert (snapshot(state), identity(state), os.stat(state).st_mtime_ns) == (before, ids, mtime)


def test_strip_keeps_the_folders_mtime(tmp_path: Path) -> None:
    """The folder keeps its mtime, so rotate_checkpoints' mtime order still finds the newest."""
    old = make_transformers(tmp_path / "checkpoint-1")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    folders.strip_folder(old, profile="transformers")
    assert os.stat(old).st_mtime_ns == 1_000_000_000


def test_changed_file_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file rewritten between the plan and its move: the strip rolls back and says `changed`."""
    ckpt = make_transformers(tmp_path / "checkpoint-3", ranks=2)
    before = snapshot(ckpt)

    def rewrite(label: str) -> None:
        if label == "move aside rng_state_1.pth":
            (ckpt / "scheduler.pt").write_bytes(before["scheduler.pt"] + b"more")

    monkeypatch.setattr(folders, "STEP_HOOK", rewrite)
    with pytest.raises(SourceChanged, match=r"scheduler\.pt was written again"):
        folders.strip_folder(ckpt, profile="transformers")
    after = snapshot(ckpt)
    assert after["scheduler.pt"] == before["scheduler.pt"] + b"more"
    assert {n: b for n, b in after.items() if n != "scheduler.pt"} == \
        {n: b for n, b in before.items() if n != "scheduler.pt"}
    assert own_names(ckpt) == []


def test_changed_last_file_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last file (removed in place after the commit) rewritten before the commit: rolled back."""
    state = make_accelerate(tmp_path / "step_1")
    before = snapshot(state)

    def rewrite(label: str) -> None:
        if label == "fsync folder" and not (state / "random_states_0.pkl").exists():
            with open(state / "optimizer.bin", "ab") as f:
                f.write(b"x")

    monkeypatch.setattr(folders, "STEP_HOOK", rewrite)
    with pytest.raises(SourceChanged):
        folders.strip_folder(state, profile="accelerate")
    after = snapshot(state)
    assert after["optimizer.bin"] == before["optimizer.bin"] + b"x"
    assert sorted(after) == sorted(before)
    assert own_names(state) == []


def test_last_file_written_after_the_commit_rolls_back(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The last file rewritten right after the commit, before any unlink: back to begun, rolled back."""
    state = make_accelerate(tmp_path / "step_1")
    before = snapshot(state)

    def rewrite(label: str) -> None:
        journal = state / folders.JOURNAL
        if label == "fsync folder" and journal.exists() \
                and json.loads(journal.read_text())["state"] == "committed" \
                and (state / "optimizer.bin").read_bytes() == before["optimizer.bin"]:
            with open(state / "optimizer.bin", "ab") as f:
                f.write(b"x")

    monkeypatch.setattr(folders, "STEP_HOOK", rewrite)
    with pytest.raises(SourceChanged, match=r"optimizer\.bin was written again"):
        folders.strip_folder(state, profile="accelerate")
    after = snapshot(state)
    assert after == {**before, "optimizer.bin": before["optimizer.bin"] + b"x"}
    assert own_names(state) == []


def test_symlinked_folder_is_refused(tmp_path: Path) -> None:
    """A checkpoint folder that is a symlink is never followed: not_a_file, the target untouched."""
    real = make_transformers(tmp_path / "real" / "checkpoint-3")
    link = tmp_path / "checkpoint-3"
    link.symlink_to(real, target_is_directory=True)
    ids = identity(real)
    with pytest.raises(NotARegularFile):
        folders.strip_folder(link, profile="transformers")
    assert identity(real) == ids


def test_symlink_inside_is_never_followed(tmp_path: Path) -> None:
    """An optimizer.pt that is a symlink is not a file to remove: it and its target stay."""
    ckpt = make_transformers(tmp_path / "checkpoint-3")
    outside = tmp_path / "precious.pt"
    (ckpt / "optimizer.pt").rename(outside)
    (ckpt / "optimizer.pt").symlink_to(outside)
    content = outside.read_bytes()
    o = folders.strip_folder(ckpt, profile="transformers")
    assert o.status == "stripped"
    assert o.reason == "kept, of unknown purpose: optimizer.pt"
    assert (ckpt / "optimizer.pt").is_symlink() and outside.read_bytes() == content


def test_second_strip_of_a_busy_folder_is_refused(tmp_path: Path) -> None:
    """While another process holds the folder, a strip refuses and a replay does nothing."""
    ckpt = make_transformers(tmp_path / "checkpoint-3")
    ids = identity(ckpt)
    fd = os.open(ckpt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pid = os.fork()
        if pid == 0:  # flock belongs to the open file: another process must be refused
            code = 1
            try:
                folders.strip_folder(ckpt, profile="transformers")
            except SourceChanged:
                code = 0 if folders.replay(ckpt) is None else 2
            finally:
                os._exit(code)
        assert wait_exit(pid) == 0
    finally:
        os.close(fd)
    assert identity(ckpt) == ids


def test_unreadable_journal_stops_the_strip(tmp_path: Path) -> None:
    """A journal that does not parse is never acted on: replay reports it, strip refuses."""
    ckpt = make_transformers(tmp_path / "checkpoint-3")
    (ckpt / folders.JOURNAL).write_text("{not json")
    ids = identity(ckpt)
    assert (folders.replay(ckpt) or "").startswith("left as it is: ")
    with pytest.raises(Unsupported):
        folders.strip_folder(ckpt, profile="transformers")
    assert identity(ckpt) == ids


def test_journal_naming_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """A planted journal cannot make a replay rename or unlink anything outside its folder."""
    ckpt = make_transformers(tmp_path / "checkpoint-3")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    st = os.stat(victim)
    journal = {"version": 1, "state": "committed", "strip": "x", "folder_times": None,
               "files": [{"name": "../victim.txt", "aside": None, "ino": st.st_ino,
                          "size": st.st_size, "mtime_ns": st.st_mtime_ns}]}
    (ckpt / folders.JOURNAL).write_text(json.dumps(journal))
    assert (folders.replay(ckpt) or "").startswith("left as it is: ")
    assert victim.read_text() == "keep me"


def test_restore_refuses_a_taken_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Restore of a folder where a removed name is back: exit 1, nothing restored, nothing overwritten."""
    ckpt = make_transformers(tmp_path / "root" / "checkpoint-3")
    arch = tmp_path / "archive"
    folders.strip_folder(ckpt, profile="transformers", archive_dir=arch, root=tmp_path / "root")
    (ckpt / "optimizer.pt").write_bytes(b"a resumed run's new optimizer")
    ids = identity(ckpt)
    assert restore(ckpt, arch) == 1
    assert "optimizer.pt already there" in capsys.readouterr().err
    assert identity(ckpt) == ids


def test_restore_takes_the_newest_folder_strip(tmp_path: Path) -> None:
    """Two strips of one folder (the trainer saved it again): restore brings back the second."""
    root = tmp_path / "root"
    ckpt = make_transformers(root / "checkpoint-3")
    arch = tmp_path / "archive"
    folders.strip_folder(ckpt, profile="transformers", archive_dir=arch, root=root)
    torch.save({"last_epoch": 99}, ckpt / "scheduler.pt")
    second = (ckpt / "scheduler.pt").read_bytes()
    folders.strip_folder(ckpt, profile="transformers", archive_dir=arch, root=root)
    assert restore(ckpt, arch) == 0
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "trainer_state.json",
         "training_args.bin", "scheduler.pt"])
    assert (ckpt / "scheduler.pt").read_bytes() == second


# ------------------------------------------------------------------------------ discovery


def test_discovery_of_checkpoint_folders() -> None:
    """checkpoint-N with trainer_state.json is a unit; accelerate folders by model + optimizer."""
    def look(rel: str, *names: str, dirs: tuple[str, ...] = ()) -> common.Look:
        return common.Look(PurePosixPath(rel), {**{n: False for n in names}, **{d: True for d in dirs}})

    t = transformers.discover(look("out/checkpoint-500", "trainer_state.json", "model.safetensors"))
    assert t == common.Found("out", (common.Unit("out/checkpoint-500", common.FOLDER, "transformers",
                                                 series="checkpoint", index=(500,)),))
    assert transformers.discover(look("out/checkpoint-5", "model.safetensors", "config.json")) is None
    assert transformers.discover(look("out/best", "trainer_state.json")) is None
    a = accelerate.discover(look("proj/checkpoints/checkpoint_3", "model.safetensors", "optimizer.bin"))
    assert a == common.Found("proj/checkpoints", (common.Unit(
        "proj/checkpoints/checkpoint_3", common.FOLDER, "accelerate", series="checkpoint", index=(3,)),))
    assert accelerate.discover(look("x/final", "model.safetensors")) is None
    assert accelerate.discover(look("x/ds", "random_states_0.pkl", "latest", dirs=("pytorch_model",))
                               ) is not None  # found, so that it is reported as not supported
    assert accelerate.discover(look("o/checkpoint-2", "trainer_state.json", "optimizer.bin",
                                    "pytorch_model_fsdp.bin")) is None
    a2 = accelerate.discover(look("run", "model.safetensors", "optimizer.bin"))
    assert a2 is not None and a2.units[0].series is None and a2.units[0].index == ()
    assert {"transformers", "accelerate"} <= {p.NAME for p in registry.FOLDER_PROFILES}


# ------------------------------------------------------------------------------ kill -9


def wait_exit(pid: int, timeout: float = 30.0) -> int:
    """The child's exit status, polled with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout:g}s")
        time.sleep(0.0005)  # the poll period, not a synchronisation guess


def kill_at(op: int, work: Callable[[], object], timeout: float = 30.0) -> str | None:
    """Run `work` in a child that stops itself before its op-th disk step; SIGKILL it there.

    The label of the step it was killed before, or None when it finished first.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            count = [0]

            def hook(label: str) -> None:
                if count[0] == op:
                    os.write(w, label.encode())
                    os.kill(os.getpid(), signal.SIGSTOP)
                count[0] += 1

            folders.STEP_HOOK = hook
            work()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
            if done and os.WIFSTOPPED(status):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return os.read(r, 1000).decode()
            if done:
                assert os.waitstatus_to_exitcode(status) == 0, "the strip failed in the child"
                return None
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the child did not reach step {op} within {timeout:g}s")
            time.sleep(0.0005)  # the poll period, not a synchronisation guess
    finally:
        os.close(r)


def same_step(a: str, b: str) -> bool:
    """Two step labels, each strip's random id aside."""
    return re.sub(r"aside\.[0-9a-f]+\.", "", a) == re.sub(r"aside\.[0-9a-f]+\.", "", b)


def count_steps(work: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    labels: list[str] = []
    monkeypatch.setattr(folders, "STEP_HOOK", labels.append)
    work()
    monkeypatch.setattr(folders, "STEP_HOOK", None)
    return labels


@dataclass
class Case:
    name: str
    make: Callable[[Path], Path]
    profile: str
    archive: bool


def _corpus_case(kind: str, sub: str) -> Callable[[Path], Path]:
    def make(dest: Path) -> Path:
        return copy_folder(CORPUS / kind / "interrupted" / sub, dest)
    return make


CASES = [
    Case("transformers-4-ranks-archived", lambda p: make_transformers(p, ranks=4), "transformers", True),
    Case("transformers-2-ranks", lambda p: make_transformers(p, ranks=2), "transformers", False),
    Case("transformers-8-ranks", lambda p: make_transformers(p, ranks=8), "transformers", False),
    Case("accelerate-multi-archived", lambda p: make_accelerate(p, models=2, optimizers=2, ranks=2),
         "accelerate", True),
    Case("accelerate", make_accelerate, "accelerate", False),
    Case("accelerate-4-ranks", lambda p: make_accelerate(p, optimizers=2, ranks=4), "accelerate", False),
]
if CORPUS.is_dir():
    CASES += [Case("corpus-transformers", _corpus_case("transformers", "checkpoint-1"),
                   "transformers", True),
              Case("corpus-accelerate", _corpus_case("accelerate", "step_1"), "accelerate", False)]


@contextlib.contextmanager
def fresh(tmp_path: Path, case: Case, n: int) -> Iterator[tuple[Path, Path | None]]:
    base = tmp_path / f"{case.name}-{n}"
    path = case.make(base / "run" / ("checkpoint-1" if case.profile == "transformers" else "step_1"))
    arch = base / "archive" if case.archive else None
    try:
        yield path, arch
    finally:
        shutil.rmtree(base)


def check_consistent(path: Path, original: Snapshot, stripped: Snapshot, times: int | None) -> str:
    """'original' or 'stripped'; anything else (half, our names left) fails the test here.

    `times`: the folder's mtime must be its own again (None: the kill came just before that
    last step, after the journal was gone, so nothing can give it back).
    """
    assert own_names(path) == [], f"our names left: {own_names(path)}"
    now = snapshot(path)
    assert now in (original, stripped), f"half stripped: {sorted(now)}"
    if times is not None:
        assert os.stat(path).st_mtime_ns == times
    return "original" if now == original else "stripped"


def crash_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cases: list[Case],
                replay_kills: int, rng: random.Random) -> tuple[int, int, dict[str, int]]:
    """Kill the strip before each of its steps, then its replay up to `replay_kills` times.

    (strips killed, replays killed, how many ended original and how many stripped)
    """
    kills, replays, verdicts = 0, 0, {"original": 0, "stripped": 0}
    for case in cases:
        with fresh(tmp_path, case, -1) as (path, arch):
            original = snapshot(path)
            plan = registry.BY_NAME[case.profile].plan(path)
            stripped = {n: b for n, b in original.items() if n not in plan.remove}
            steps = count_steps(lambda p=path, a=arch, c=case: folders.strip_folder(
                p, profile=c.profile, archive_dir=a, root=p.parent.parent), monkeypatch)
        for op in range(len(steps)):
            with fresh(tmp_path, case, op) as (path, arch):
                times: int | None = os.stat(path).st_mtime_ns
                at = kill_at(op, lambda p=path, a=arch, c=case: folders.strip_folder(
                    p, profile=c.profile, archive_dir=a, root=p.parent.parent))
                assert at is not None and same_step(at, steps[op]), (at, steps[op])
                kills += 1
                labels = [at]
                for _ in range(replay_kills):  # a kill during the replay of a kill
                    at = kill_at(rng.randrange(12), lambda p=path: folders.replay(p))
                    if at is not None:
                        replays += 1
                        labels.append(at)
                folders.replay(path)
                if "folder mtime" in labels:
                    times = None
                verdict = check_consistent(path, original, stripped, times)
                verdicts[verdict] += 1
                if verdict == "stripped" and arch is not None:  # the archive has all it took
                    assert restore(path, arch) == 0
                    assert snapshot(path) == original
    return kills, replays, verdicts


def test_kill_9_at_every_step_leaves_original_or_stripped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL before each disk step of a strip (and in some replays): replay gives all or nothing."""
    kills, replays, verdicts = crash_round(tmp_path, monkeypatch, CASES, replay_kills=1,
                                           rng=random.Random(20261201))
    assert kills >= (200 if CORPUS.is_dir() else 160) and replays >= 50, (kills, replays)
    assert verdicts["original"] > 0 and verdicts["stripped"] > 0, verdicts


@pytest.mark.slow
def test_kill_9_many_ranks_and_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with 64 ranks' files and three kills in each replay: thousands of kill points."""
    cases = [Case("transformers-64-ranks-archived", lambda p: make_transformers(p, ranks=64),
                  "transformers", True),
             Case("accelerate-16-ranks", lambda p: make_accelerate(p, optimizers=8, ranks=16),
                  "accelerate", False), *CASES]
    kills, replays, verdicts = crash_round(tmp_path, monkeypatch, cases, replay_kills=3,
                                           rng=random.Random(20261202))
    assert kills + replays >= 1000, (kills, replays)
    assert verdicts["original"] > 0 and verdicts["stripped"] > 0, verdicts


# ------------------------------------------------------------------------------ the CLI


def test_cli_strips_a_folder_and_names_its_profile(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`ckpt-watchd strip DIR` finds the folder's profile itself, says it, strips in place; a
    torn folder is reported incomplete and left; a folder of no trainer fails; -o is refused."""
    from ckpt_watchd import cli

    hf = make_transformers(tmp_path / "out" / "checkpoint-3")
    acc = make_accelerate(tmp_path / "project" / "checkpoint_1")
    torn = make_transformers(tmp_path / "out" / "checkpoint-4")
    (torn / "optimizer.pt").write_bytes(b"")
    torn_before = snapshot(torn)
    plain = tmp_path / "plain"
    plain.mkdir()
    capsys.readouterr()
    assert cli.main(["strip", str(hf), str(acc), str(torn), str(plain)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{hf}: stripped (transformers) ")
    assert lines[1].startswith(f"{acc}: stripped (accelerate) ")
    assert "kept, of unknown purpose: custom_checkpoint_0.pkl" in lines[1]
    assert lines[2].startswith(f"{torn}: incomplete, left as it is (")
    assert lines[3] == f"{plain}: failed: is a directory, but not a checkpoint folder of a trainer we know"
    assert sorted(snapshot(hf)) == ["config.json", "generation_config.json", "model.safetensors",
                                    "trainer_state.json", "training_args.bin"]
    assert "optimizer.bin" not in snapshot(acc) and "custom_checkpoint_0.pkl" in snapshot(acc)
    assert snapshot(torn) == torn_before
    assert cli.main(["strip", "-o", str(tmp_path / "x.pt"), str(hf)]) == 2
    assert "a checkpoint folder is stripped in place" in capsys.readouterr().err


def test_cli_inspects_a_folder_without_changing_it(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`inspect DIR`: the profile, each file with what a strip does to it, the size after."""
    from ckpt_watchd import cli

    acc = make_accelerate(tmp_path / "project" / "checkpoint_1")
    before = identity(acc)
    capsys.readouterr()
    assert cli.main(["inspect", "--json", str(acc)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["profile"] == "accelerate"
    assert {f["name"] for f in r["remove"]} == {"optimizer.bin", "scheduler.bin", "sampler.bin",
                                                "random_states_0.pkl"}
    assert [f["name"] for f in r["keep"]] == ["model.safetensors"]
    assert [f["name"] for f in r["unknown"]] == ["custom_checkpoint_0.pkl"]
    sizes = {p.name: p.stat().st_size for p in acc.iterdir()}
    assert r["bytes"] == sum(sizes.values())
    assert r["bytes_after_strip"] == sizes["model.safetensors"] + sizes["custom_checkpoint_0.pkl"]
    assert cli.main(["inspect", str(acc)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].endswith("a checkpoint folder, trainer: accelerate")
    assert any(line.split()[0] == "optimizer.bin" and line.endswith("removed by a strip")
               for line in text)
    assert identity(acc) == before
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "not a checkpoint folder of a trainer we know" in capsys.readouterr().err
