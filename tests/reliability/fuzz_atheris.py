"""Coverage-guided fuzzing of the safe loader with atheris (libFuzzer); not collected by pytest.

Usage (atheris is not a project dependency: `pip install atheris` first):

    python tests/reliability/fuzz_atheris.py [--pickle-only] [--seed-from DIR] CORPUS_DIR [flags]
    e.g. python tests/reliability/fuzz_atheris.py --seed-from /tmp/ckpts /tmp/fuzz-corpus \
             -runs=20000 -rss_limit_mb=4096 -artifact_prefix=/tmp/fuzz-

CORPUS_DIR starts as real checkpoints (`--seed-from DIR` copies the *.pt files of DIR into it, or
the data.pkl of its zip ones with `--pickle-only`: a legacy or tar file is refused as unsupported
before anything is unpickled, so it only seeds the container check); libFuzzer adds the inputs
that reach new code. With `--pickle-only` each input is a data.pkl swapped into a valid torch zip
(every other record kept exactly as it was), so the unpickler is reached. Anything but success or
a `CheckpointError` is a crash: libFuzzer saves the input as `crash-*`. Only ckpt_watchd is
instrumented for coverage (torch would take minutes); each load runs under the worker's per-job
memory cap, raised step by step as in the daemon.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # noqa: F401  (imported before instrumenting: instrumenting torch takes minutes)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fixtures.opfuzz
from fixtures.opfuzz import data_pkl, swap_data_pkl

with atheris.instrument_imports(include=["ckpt_watchd"]):
    from ckpt_watchd.engine import safeload
    from ckpt_watchd.errors import CheckpointError
    from ckpt_watchd.worker import memory_cap

_TMP = Path(tempfile.mkdtemp(prefix="ckpt-watchd-atheris-"))
_TEMPLATE: bytes | None = None  # a torch zip whose data.pkl each --pickle-only input replaces
_ZIP_MAGIC = b"PK\x03\x04"


def test_one_input(data: bytes) -> None:
    if _TEMPLATE is not None:
        data = swap_data_pkl(_TEMPLATE, data)
    path = _TMP / "input.pt"
    # unlink first: the previous load may still map the previous file's pages
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    with contextlib.suppress(CheckpointError), memory_cap() as cap:  # as in a worker
        safeload.load(path, need=cap.need)


def _seed(corpus: Path, source: Path, pickle_only: bool) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for pt in sorted(source.glob("*.pt")):
        data = pt.read_bytes()
        if pickle_only:
            if not data.startswith(_ZIP_MAGIC):
                continue  # legacy or tar: it has no data.pkl
            data = data_pkl(data)
        (corpus / pt.name).write_bytes(data)


def main(argv: list[str]) -> None:
    global _TEMPLATE
    args = list(argv)
    pickle_only = "--pickle-only" in args
    if pickle_only:
        args.remove("--pickle-only")
    if "--seed-from" in args:
        i = args.index("--seed-from")
        source = Path(args[i + 1])
        del args[i:i + 2]
        corpus = next(Path(a) for a in args[1:] if not a.startswith("-"))
        _seed(corpus, source, pickle_only)
        if pickle_only:
            _TEMPLATE = next(p.read_bytes() for p in sorted(source.glob("*.pt"))
                             if p.read_bytes().startswith(_ZIP_MAGIC))
    elif pickle_only:
        template = os.environ.get("CKPT_WATCHD_FUZZ_TEMPLATE")
        if not template:
            sys.exit("--pickle-only needs --seed-from DIR or CKPT_WATCHD_FUZZ_TEMPLATE=a torch zip")
        _TEMPLATE = Path(template).read_bytes()
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
