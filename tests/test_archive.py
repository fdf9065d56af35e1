"""--archive-dir: keeping originals before they are replaced, the manifest, and `restore`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_watchd import cli
from ckpt_watchd.errors import SourceChanged, WriteFailed
from ckpt_watchd.records.archive import Archiver, FolderStrip, read_manifest, restore

ORIGINAL = b"original checkpoint with optimizer state " * 1000
STRIPPED = b"stripped" * 100


@dataclass(frozen=True)
class Facts:
    ino: int
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    dev: int

    @classmethod
    def of(cls, path: Path) -> Facts:
        st = os.lstat(path)
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid,
                   st.st_dev)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def ckpt(root: Path) -> Path:
    path = root / "train" / "exp" / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(ORIGINAL)
    os.chmod(path, 0o640)
    return path


def no_link(*_args: object, **_kw: object) -> None:
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def replace_with_stripped(path: Path) -> None:
    """What checkpoint.strip_file does right after keep(): a new inode takes the name."""
    tmp = path.with_name(".ckpt-watchd-tmp")
    tmp.write_bytes(STRIPPED)
    os.replace(tmp, path)


def test_keep_then_restore_round_trip(tmp_path: Path, root: Path, ckpt: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A kept original survives the replace and restore puts its exact bytes and mode back."""
    facts = Facts.of(ckpt)
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, facts)
    replace_with_stripped(ckpt)
    assert ckpt.read_bytes() == STRIPPED
    assert restore(ckpt, arch) == 0
    assert ckpt.read_bytes() == ORIGINAL
    st = os.lstat(ckpt)
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, facts.mtime_ns)
    archived = arch / "train" / "exp" / "weights" / f"last.{facts.mtime_ns}.pt"
    assert capsys.readouterr().out == f"{ckpt}: restored from {archived}\n"
    assert st.st_ino != os.lstat(archived).st_ino  # a resumed run must not write into the archive
    assert archived.read_bytes() == ORIGINAL
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".ckpt-watchd-")]


def test_same_filesystem_keeps_by_hard_link(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """On the same filesystem the archive holds the original inode, mirrored under the root."""
    facts = Facts.of(ckpt)
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, facts)
    archived = arch / "train" / "exp" / "weights" / f"last.{facts.mtime_ns}.pt"
    assert os.lstat(archived).st_ino == facts.ino
    assert ckpt.read_bytes() == ORIGINAL  # still in place until os.replace


def test_cross_device_copies(tmp_path: Path, root: Path, ckpt: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """When a hard link is impossible (EXDEV) the original is copied with its mode and mtime."""
    monkeypatch.setattr(os, "link", no_link)
    facts = Facts.of(ckpt)
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, facts)
    archived = Path(read_manifest(arch)[0]["archived"])
    st = os.lstat(archived)
    assert archived.read_bytes() == ORIGINAL
    assert st.st_ino != facts.ino
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, facts.mtime_ns)
    assert not [p for p in archived.parent.iterdir() if p != archived]  # no temp left behind
    replace_with_stripped(ckpt)
    assert restore(ckpt, arch) == 0
    assert ckpt.read_bytes() == ORIGINAL


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_copy_and_restore_keep_the_owner(tmp_path: Path, root: Path, ckpt: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The archived copy and the restored file keep the original's owner and group."""
    os.chown(ckpt, 4321, 8765)
    monkeypatch.setattr(os, "link", no_link)
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, Facts.of(ckpt))
    archived = Path(read_manifest(arch)[0]["archived"])
    assert (os.lstat(archived).st_uid, os.lstat(archived).st_gid) == (4321, 8765)
    replace_with_stripped(ckpt)
    assert restore(ckpt, arch) == 0
    assert (os.lstat(ckpt).st_uid, os.lstat(ckpt).st_gid) == (4321, 8765)


def test_manifest_lines_parse(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """Each keep appends one JSON line with original, archived, size, mtime_ns, sha256, time."""
    facts = Facts.of(ckpt)
    arch = tmp_path / "archive"
    Archiver(arch, root, hashes=True, clock=lambda: "2024-05-01T00:00:00+00:00").keep(ckpt, facts)
    lines = (arch / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "original": str(ckpt.resolve()),
        "archived": str(arch / "train" / "exp" / "weights" / f"last.{facts.mtime_ns}.pt"),
        "size": len(ORIGINAL), "mtime_ns": facts.mtime_ns,
        "sha256": hashlib.sha256(ORIGINAL).hexdigest(),
        "archived_at": "2024-05-01T00:00:00+00:00",
    }


def test_restore_takes_the_newest_entry(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """After two strips of the same path, restore brings back the later original."""
    arch = tmp_path / "archive"
    archiver = Archiver(arch, root)
    archiver.keep(ckpt, Facts.of(ckpt))
    replace_with_stripped(ckpt)
    ckpt.write_bytes(b"second training session")  # a resumed run wrote a new last.pt
    os.utime(ckpt, ns=(1, 2_000_000_000))
    archiver.keep(ckpt, Facts.of(ckpt))
    replace_with_stripped(ckpt)
    assert len(read_manifest(arch)) == 2
    assert restore(ckpt, arch) == 0
    assert ckpt.read_bytes() == b"second training session"


def test_same_mtime_gets_a_distinct_name(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """Two different originals with the same mtime_ns never overwrite each other."""
    arch = tmp_path / "archive"
    facts = Facts.of(ckpt)
    Archiver(arch, root).keep(ckpt, facts)
    replace_with_stripped(ckpt)
    ckpt.write_bytes(b"another file")
    os.utime(ckpt, ns=(1, facts.mtime_ns))
    Archiver(arch, root).keep(ckpt, Facts.of(ckpt))
    kept = [Path(e["archived"]) for e in read_manifest(arch)]
    assert kept[0] != kept[1]
    assert [p.read_bytes() for p in kept] == [ORIGINAL, b"another file"]


def test_keep_refuses_a_changed_source(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """If the file no longer has the facts we read, nothing is archived: SourceChanged."""
    facts = Facts.of(ckpt)
    ckpt.write_bytes(ORIGINAL + b"one more epoch")
    arch = tmp_path / "archive"
    with pytest.raises(SourceChanged):
        Archiver(arch, root).keep(ckpt, facts)
    assert read_manifest(arch) == []
    assert not [p for p in arch.rglob("*") if p.is_file()]


def test_keep_outside_root_mirrors_the_absolute_path(tmp_path: Path, ckpt: Path) -> None:
    """A file outside the root (or with no root) is archived under its absolute path."""
    arch = tmp_path / "archive"
    facts = Facts.of(ckpt)
    Archiver(arch, None).keep(ckpt, facts)
    rel = ckpt.resolve().relative_to("/")
    assert (arch / rel.parent / f"last.{facts.mtime_ns}.pt").read_bytes() == ORIGINAL


def test_keep_failure_is_write_failed(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """An archive dir that cannot be created fails the job with WriteFailed, file untouched."""
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(WriteFailed, match="cannot archive the original"):
        Archiver(tmp_path / "blocker" / "archive", root).keep(ckpt, Facts.of(ckpt))
    assert ckpt.read_bytes() == ORIGINAL


def test_restore_without_entry(tmp_path: Path, root: Path, ckpt: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """restore of a path the archive does not know: exit 1, a clear message, file untouched."""
    arch = tmp_path / "archive"
    arch.mkdir()
    assert restore(ckpt, arch) == 1
    assert "no archived original" in capsys.readouterr().err
    assert ckpt.read_bytes() == ORIGINAL


def test_restore_with_missing_archived_file(tmp_path: Path, root: Path, ckpt: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest entry whose archived file was deleted: exit 1, says it is missing."""
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, Facts.of(ckpt))
    replace_with_stripped(ckpt)
    Path(read_manifest(arch)[0]["archived"]).unlink()
    assert restore(ckpt, arch) == 1
    assert "is missing" in capsys.readouterr().err
    assert ckpt.read_bytes() == STRIPPED


def test_restore_refuses_a_damaged_archive(tmp_path: Path, root: Path, ckpt: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An archived file whose size no longer matches the manifest is not put back."""
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, Facts.of(ckpt))
    replace_with_stripped(ckpt)
    with open(read_manifest(arch)[0]["archived"], "ab") as f:
        f.write(b"junk")
    assert restore(ckpt, arch) == 1
    assert "not restored" in capsys.readouterr().err
    assert ckpt.read_bytes() == STRIPPED


def test_torn_manifest_line_is_ignored(tmp_path: Path, root: Path, ckpt: Path) -> None:
    """A manifest whose last line was cut by a kill still restores from the complete entries."""
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, Facts.of(ckpt))
    with open(arch / "manifest.jsonl", "a") as f:
        f.write('{"original": "' + str(ckpt))
    replace_with_stripped(ckpt)
    assert len(read_manifest(arch)) == 1
    assert restore(ckpt, arch) == 0
    assert ckpt.read_bytes() == ORIGINAL


def test_cli_restore(tmp_path: Path, root: Path, ckpt: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """`ckpt-watchd restore PATH --archive-dir DIR` restores and exits 0; unknown paths exit 1."""
    arch = tmp_path / "archive"
    Archiver(arch, root).keep(ckpt, Facts.of(ckpt))
    replace_with_stripped(ckpt)
    assert cli.main(["restore", str(ckpt), "--archive-dir", str(arch)]) == 0
    assert ckpt.read_bytes() == ORIGINAL
    assert cli.main(["restore", str(root / "nope.pt"), "--archive-dir", str(arch)]) == 1
    assert "restored from" in capsys.readouterr().out


def test_worker_strip_archives_then_restore_resumes(tmp_path: Path, root: Path) -> None:
    """A real strip job with an archive dir keeps the original, and restore brings it back."""
    torch = pytest.importorskip("torch")
    from ckpt_watchd.worker import StripJob, run_job

    path = root / "train" / "exp" / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(64, 64)}, "epoch": 3,
                "optimizer": {"state": {0: torch.ones(64, 64)}}}, path)
    original = path.read_bytes()
    arch = tmp_path / "archive"
    outcome = run_job(StripJob(path=str(path), archive_dir=str(arch), root=str(root)))
    assert outcome.status == "stripped", outcome
    assert path.read_bytes() != original
    [entry] = read_manifest(arch)
    assert Path(entry["archived"]).read_bytes() == original
    assert restore(path, arch) == 0
    assert path.read_bytes() == original


# ------------------------------------------------------------------------------ folder strips


@pytest.fixture
def ckpt_folder(root: Path) -> Path:
    folder = root / "out" / "checkpoint-2"
    folder.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt", "model.safetensors"):
        (folder / name).write_bytes(name.encode() * 100)
    os.utime(folder, ns=(1, 5_000_000_000))
    return folder


def keep_folder(arch: Path, root: Path, folder: Path, names: tuple[str, ...], *,
                strip: str = "s1", files: int | None = None) -> None:
    """Archive `names` as one folder strip, then remove them as the strip does."""
    fs = FolderStrip(strip, len(names) if files is None else files, os.lstat(folder).st_mtime_ns)
    archiver = Archiver(arch, root, clock=lambda: "2024-05-01T00:00:00+00:00")
    for name in names:
        archiver.keep(folder / name, Facts.of(folder / name), strip=fs)
    for name in names:
        (folder / name).unlink()
    os.utime(folder, ns=(1, 5_000_000_000))


def test_folder_strip_entries_name_their_folder(tmp_path: Path, root: Path, ckpt_folder: Path) -> None:
    """A folder strip's manifest entry adds the folder, the strip, its file count and the folder mtime."""
    arch = tmp_path / "archive"
    facts = Facts.of(ckpt_folder / "optimizer.pt")
    keep_folder(arch, root, ckpt_folder, ("optimizer.pt",))
    assert read_manifest(arch) == [{
        "original": str(ckpt_folder / "optimizer.pt"),
        "archived": str(arch / "out" / "checkpoint-2" / f"optimizer.{facts.mtime_ns}.pt"),
        "size": facts.size, "mtime_ns": facts.mtime_ns, "folder": str(ckpt_folder),
        "strip": "s1", "strip_files": 1, "folder_mtime_ns": 5_000_000_000,
        "archived_at": "2024-05-01T00:00:00+00:00"}]


def test_restore_folder_puts_every_file_back(tmp_path: Path, root: Path, ckpt_folder: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`restore FOLDER` brings back each file of its strip, byte-identical, and the folder's mtime."""
    before = {p.name: p.read_bytes() for p in ckpt_folder.iterdir()}
    arch = tmp_path / "archive"
    keep_folder(arch, root, ckpt_folder, ("optimizer.pt", "scheduler.pt"))
    assert cli.main(["restore", str(ckpt_folder), "--archive-dir", str(arch)]) == 0
    assert {p.name: p.read_bytes() for p in ckpt_folder.iterdir()} == before
    assert os.lstat(ckpt_folder).st_mtime_ns == 5_000_000_000
    assert capsys.readouterr().out == f"{ckpt_folder}: restored 2 files from {arch}\n"


def test_restore_folder_ignores_a_strip_that_never_finished_archiving(
        tmp_path: Path, root: Path, ckpt_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A strip with fewer entries than it meant to archive (killed mid-way) is not restored from."""
    arch = tmp_path / "archive"
    keep_folder(arch, root, ckpt_folder, ("optimizer.pt",), files=2)
    assert restore(ckpt_folder, arch) == 1
    assert "no archived folder strip" in capsys.readouterr().err
    assert not (ckpt_folder / "optimizer.pt").exists()


def test_restore_folder_is_all_or_nothing_on_a_missing_archive(
        tmp_path: Path, root: Path, ckpt_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """If one archived file is gone, no file of the folder is put back."""
    arch = tmp_path / "archive"
    keep_folder(arch, root, ckpt_folder, ("optimizer.pt", "scheduler.pt"))
    Path(read_manifest(arch)[1]["archived"]).unlink()
    assert restore(ckpt_folder, arch) == 1
    assert "is missing; nothing restored" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt_folder.iterdir()) == ["model.safetensors"]


def test_one_file_of_a_folder_strip_restores_alone(tmp_path: Path, root: Path,
                                                   ckpt_folder: Path) -> None:
    """`restore FILE` still works for a file a folder strip removed."""
    data = (ckpt_folder / "scheduler.pt").read_bytes()
    arch = tmp_path / "archive"
    keep_folder(arch, root, ckpt_folder, ("optimizer.pt", "scheduler.pt"))
    assert restore(ckpt_folder / "scheduler.pt", arch) == 0
    assert (ckpt_folder / "scheduler.pt").read_bytes() == data
    assert not (ckpt_folder / "optimizer.pt").exists()
