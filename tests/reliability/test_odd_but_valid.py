"""Family 7 of the safe-loading issue: odd but valid files, and names that forge output lines.

Each file here is one a trainer could write. Some must strip into a file that loads (and equals
the input minus what the strip drops) where the trainer's classes import; some must be refused
once, untouched, as "unrecognised". Which expectation is the issue's own words and which is our
reading is said per case. Files are made by torch.save in a subprocess where the classes exist.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures import harness
from fixtures.daemon_io import clean_env, temp_files
from reliability.conftest import Daemon, set_age

# Trainer-side modules the odd files name: a nested class, a class built with keyword arguments
# (NEWOBJ_EX), and a non-ASCII package. They exist only in the subprocesses that save and load.
_MODULES = {
    "oddtrainer/__init__.py": "",
    "oddtrainer/things.py": '''
class Thing:
    class Inner:
        def __init__(self, x=0):
            self.x = x


class KwThing:
    def __new__(cls, *, size):
        self = object.__new__(cls)
        self.size = size
        return self

    def __getnewargs_ex__(self):
        return (), {"size": self.size}
''',
    "modèles/__init__.py": "",
    "modèles/réseau.py": '''
class Modèle:
    def __init__(self):
        self.poids = 1.5
        self.étiquette = "détecteur"
''',
}

# Runs where the fake trainers and the odd modules import: writes each odd file (argv: the
# generated yolov5.pt, the output folder).
_MAKE = r"""
import math, sys, torch
from pathlib import Path
src, out = sys.argv[1], Path(sys.argv[2])
from oddtrainer.things import Thing, KwThing
import importlib
Modele = getattr(importlib.import_module("modèles.réseau"), "Modèle")

def generic(**extra):
    torch.manual_seed(0)
    return {"epoch": 4, "model_state_dict": {"w": torch.randn(3, 2)},
            "optimizer_state_dict": {"state": {0: {"momentum_buffer": torch.randn(3, 2)}},
                                     "param_groups": [{"lr": 0.1, "params": [0]}]}, **extra}

ckpt = torch.load(src, map_location="cpu", weights_only=False)
ckpt["ema"] = "an EMA that is a string"
torch.save(ckpt, out / "ema-string.pt")
ckpt = torch.load(src, map_location="cpu", weights_only=False)
ckpt["ema"] = ckpt["ema"].state_dict()
torch.save(ckpt, out / "ema-state-dict.pt")
torch.save(generic(meta=Thing.Inner(7)), out / "nested-class.pt", pickle_protocol=4)
torch.save(generic(meta=KwThing(size=3)), out / "newobj-ex.pt", pickle_protocol=4)
torch.save(generic(meta=Modele()), out / "non-ascii-module.pt", pickle_protocol=3)
torch.save({math.nan: "not a number", **generic()}, out / "nan-key.pt")
"""

# Loads a pristine input and its stripped output where the odd classes import and prints how the
# output differs from the input minus the keys a generic strip drops.
_COMPARE = r"""
import json, sys, torch
from summary import diff, summarize
before = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
after = torch.load(sys.argv[2], map_location="cpu", weights_only=False)
dropped = set(sys.argv[3].split(","))
expected = {k: v for k, v in before.items() if not (isinstance(k, str) and k in dropped)}
meta = after.get("meta")
print(json.dumps({"diff": diff(summarize(after), summarize(expected)),
                  "meta": None if meta is None else f"{type(meta).__module__}.{type(meta).__qualname__}"}))
"""

STRIPPED, UNRECOGNISED = "stripped", "unrecognised"


@dataclass(frozen=True)
class Odd:
    name: str
    expect: str
    words: str  # "issue": the issue's own expectation; "ours": our reading of it
    meta: str | None = None  # the class the stripped file's `meta` must load as


ODD = [
    # issue: "must not replace `model`; the file must be left untouched as unrecognised"
    Odd("ema-string", UNRECOGNISED, "issue"),
    Odd("ema-state-dict", UNRECOGNISED, "issue"),
    # issue: "must still load after a strip at the protocol it needs"
    Odd("nested-class", STRIPPED, "issue", "oddtrainer.things.Thing.Inner"),
    # ours: valid files a trainer writes; the strip must keep them loadable, as for nested names
    Odd("newobj-ex", STRIPPED, "ours", "oddtrainer.things.KwThing"),
    Odd("non-ascii-module", STRIPPED, "ours", "modèles.réseau.Modèle"),
    Odd("nan-key", STRIPPED, "ours"),
]
BY_NAME = {o.name: o for o in ODD}
GENERIC_DROPPED = "optimizer_state_dict"


def _odd_env(modules: Path) -> dict[str, str]:
    env = harness.trainer_env()
    env["PYTHONPATH"] = os.pathsep.join([str(harness.TRAINERS), str(modules),
                                         str(harness.FIXTURES)])
    return env


@pytest.fixture(scope="module")
def odd_files(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder of `<case>.pt`, folder of the odd trainer modules), made once per module."""
    modules = tmp_path_factory.mktemp("odd-modules")
    for rel, text in _MODULES.items():
        (modules / rel).parent.mkdir(parents=True, exist_ok=True)
        (modules / rel).write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("odd-files")
    proc = subprocess.run([sys.executable, "-c", _MAKE, str(generated / "yolov5.pt"), str(out)],
                          env=_odd_env(modules), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, modules


def _strip(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_watchd", "strip", str(path)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=clean_env())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", [o.name for o in ODD])
def test_odd_but_valid_file_strips_into_a_loadable_file_or_is_refused_untouched(
        case: str, odd_files: tuple[Path, Path], tmp_path: Path) -> None:
    """An odd file strips into one that loads and keeps its contents, or is refused untouched."""
    files, modules = odd_files
    odd = BY_NAME[case]
    path = tmp_path / "runs" / "train" / case / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(files / f"{case}.pt", path)
    pristine = (files / f"{case}.pt").read_bytes()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = _strip(path, cwd)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr[-2000:]
    assert list(cwd.iterdir()) == [] and temp_files(path.parent) == []
    if odd.expect == UNRECOGNISED:
        assert proc.returncode == 1 and lines[0].startswith(f"{path}: failed: "), lines
        assert "unrecognised" in lines[0], lines
        assert path.read_bytes() == pristine
        return
    assert proc.returncode == 0 and lines[0].startswith(f"{path}: stripped ("), lines
    compare = subprocess.run([sys.executable, "-c", _COMPARE, str(files / f"{case}.pt"),
                              str(path), GENERIC_DROPPED], env=_odd_env(modules),
                             capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0, f"the stripped file does not load:\n{compare.stderr[-3000:]}"
    seen = json.loads(compare.stdout)
    assert seen["diff"] == []
    assert seen["meta"] == odd.meta


@pytest.mark.timeout(200)
def test_unrecognised_files_are_refused_once_and_not_retried(
        odd_files: tuple[Path, Path], root: Path, daemons: Callable[..., Daemon]) -> None:
    """The daemon refuses an ema-is-a-string/state_dict file once, as final, and leaves it alone."""
    # "refused once" read as: one ckpt.failed, final, no retry scheduled (our reading)
    files, _ = odd_files
    paths = {}
    for odd in (o for o in ODD if o.expect == UNRECOGNISED):
        p = root / "train" / odd.name / "weights" / "last.pt"
        p.parent.mkdir(parents=True)
        shutil.copyfile(files / f"{odd.name}.pt", p)
        set_age(p, 3600)
        paths[odd.name] = p
    d = daemons(root, "--once", "--settle", "1", "--max-attempts", "3", "--retry-backoff", "1")
    assert d.wait(timeout=150) == 1, d.stderr_tail()
    for name, p in paths.items():
        failed = d.events("ckpt.failed", path=str(p))
        assert [(e["error_type"], e.get("final")) for e in failed] == [(UNRECOGNISED, True)], failed
        assert p.read_bytes() == (files / f"{name}.pt").read_bytes()


# A hook that appends its CKPT_STRIPPED_* environment to a file as one JSON line.
_HOOK = ("import json, os, sys; open(sys.argv[1], 'a').write(json.dumps({k: v for k, v in "
         "os.environ.items() if k.startswith('CKPT_STRIPPED')}) + '\\n')")
FORGED = "FORGED stripped (saved 99.9 GB)"


@pytest.mark.timeout(200)
def test_a_run_folder_named_with_a_newline_forges_no_line_in_status_or_the_hook(
        ckpts: Path, root: Path, tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """A run folder named with a newline forges no line in `status` or in CKPT_STRIPPED_FILES."""
    # the issue names the forgery; "one line per run / per file" is our reading of its absence
    runs = [root / "train" / f"exp\n{FORGED}", root / "train" / "plain"]
    for run in runs:
        last = run / "weights" / "last.pt"
        last.parent.mkdir(parents=True)
        shutil.copyfile(ckpts / "yolov5.pt", last)
        last.chmod(0o644)
        set_age(last, 3600)
    record = tmp_path / "hook.jsonl"
    hook = f"{shlex.quote(sys.executable)} -c {shlex.quote(_HOOK)} {shlex.quote(str(record))}"
    d = daemons(root, "--once", "--settle", "1", "--on-stripped", hook)
    assert d.wait(timeout=150) in (0, 1), d.stderr_tail()
    assert d.events("ckpt.stripped", path=str(runs[1] / "weights" / "last.pt"))
    status = subprocess.run([sys.executable, "-m", "ckpt_watchd", "status", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    # the table: a header, one row per run, a rule and the totals (no failures to list)
    assert len(lines) == 1 + len(runs) + 2, lines
    assert lines[-2].startswith("---") and lines[-1].startswith("total"), lines
    assert not any(ln.startswith(FORGED) for ln in lines), lines
    hooks: list[dict[str, Any]] = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert hooks, "the hook never ran (the plain run was stripped)"
    for env in hooks:
        files = env["CKPT_STRIPPED_FILES"].split("\n")
        assert len(files) == int(env["CKPT_STRIPPED_FILE_COUNT"]), env
        assert not any(f.startswith(FORGED) for f in files), env


@pytest.mark.timeout(120)
def test_an_epoch_too_long_to_print_strips_and_inspects_without_a_traceback(tmp_path: Path) -> None:
    """An epoch of 10**5000 is data, not an attack: strip works, inspect reports (no traceback)."""
    from fixtures import hostile as h

    path = tmp_path / "runs" / "train" / "x" / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(h.torch_zip(h.pickle(h.sdict(epoch=h.integer(10**5000),
                                                  model_state_dict=h.sdict(weight=h.tensor()),
                                                  optimizer_state_dict=h.EMPTY_DICT))))
    report = subprocess.run([sys.executable, "-m", "ckpt_watchd", "inspect", str(path)],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert report.returncode == 0 and "Traceback" not in report.stdout + report.stderr
    assert "epoch" in report.stdout and "1000000" not in report.stdout  # not printed whole
    done = _strip(path, tmp_path)
    assert done.returncode == 0 and "stripped (generic)" in done.stdout, done.stdout + done.stderr
