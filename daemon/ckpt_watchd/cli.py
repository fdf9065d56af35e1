"""Command line: argv + config file + environment -> Settings, and the one-shot commands.

It owns argument parsing, the precedence CLI > CKPT_WATCHD_* environment > config file > defaults,
the output format of `strip`, `inspect`, `status` and `restore`, and exit codes (0 ok, 1 a file failed,
2 usage or start-up error). It never imports torch itself: the one-shot commands reach it through
the worker boundary, the daemon never does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckpt_watchd import __version__
from ckpt_watchd.errors import StartupError
from ckpt_watchd.ops import display
from ckpt_watchd.settings import DEFAULT_CONFIG, OPTION_BY_NAME, OPTIONS, Settings

ENV_PREFIX = "CKPT_WATCHD_"
COMMANDS = ("run", "scan", "strip", "inspect", "status", "restore")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else "run"
    try:
        if command == "scan":
            return _cmd_scan(args)
        if command == "strip":
            return _cmd_strip(args)
        if command == "inspect":
            return _cmd_inspect(args)
        if command == "status":
            return _cmd_status(args)
        if command == "restore":
            return _cmd_restore(args)
        return _cmd_run(args)
    except StartupError as e:
        print(f"ckpt-watchd: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: usage errors (2), --help and --version (0)
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- the daemon


def daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt-watchd",
        description="Watch training runs and strip the checkpoints of finished ones. "
        "Other commands: scan, strip, inspect, status, restore (ckpt-watchd COMMAND --help).",
    )
    p.add_argument("--version", action="version", version=f"ckpt-watchd {__version__}")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help=f"TOML file with any of these options (default: {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged settings as JSON and exit")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        default_text = "" if o.default in (None, [], False) else f" (default: {_fmt(o.default)})"
        common: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS,
                                  "help": o.help + default_text}
        if o.kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif o.kind is list:
            p.add_argument(flag, action="append", metavar=o.metavar, **common)
        else:
            p.add_argument(flag, type=_argtype(o.kind), metavar=o.metavar, **common)
    return p


def _fmt(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def _argtype(kind: type) -> Any:
    return {Path: Path, int: int, float: float, str: str}[kind]


def _coerce(name: str, value: Any, source: str) -> Any:
    """One option value from a config file or the environment, checked against its type."""
    o = OPTION_BY_NAME[name]
    where = f"{source}: {name} = {value!r}"
    try:
        if o.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if o.kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError
        if o.kind is Path:
            if not isinstance(value, str) or not value:
                raise ValueError
            return Path(value)
        if o.kind is int and isinstance(value, (bool, float)):
            raise ValueError
        if o.kind is float and isinstance(value, bool):
            raise ValueError
        return o.kind(value)
    except (TypeError, ValueError):
        raise StartupError(f"bad value in {where} (expected {o.kind.__name__})") from None


def _read_config(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise StartupError(f"--config: {path}: no such file") from None
        return {}
    except OSError as e:
        raise StartupError(f"--config: {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise StartupError(f"--config: {path}: not valid TOML: {e}") from None
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in OPTION_BY_NAME:
            raise StartupError(f"{path}: unknown key {key!r}")
        out[name] = _coerce(name, value, str(path))
    return out


def _read_env(environ: dict[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in OPTION_BY_NAME:
            raise StartupError(f"environment: unknown variable {key}")
        out[name] = _coerce(name, value, f"environment {key}")
    return out


def build_settings(argv: Sequence[str], environ: dict[str, str] | None = None
                   ) -> tuple[Settings, bool]:
    """Merge defaults < config file < environment < command line into one Settings."""
    environ = dict(os.environ if environ is None else environ)
    ns = daemon_parser().parse_args(list(argv))
    cli = {k: v for k, v in vars(ns).items() if k in OPTION_BY_NAME}
    config_path = ns.config or (Path(environ[ENV_PREFIX + "CONFIG"])
                                if environ.get(ENV_PREFIX + "CONFIG") else None)
    merged: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    merged.update(_read_config(config_path or DEFAULT_CONFIG, explicit=config_path is not None))
    merged.update(_read_env(environ))
    merged.update(cli)
    if merged["root"] is None:
        raise StartupError("--root is required (the runs folder to watch)")
    values = {k: v for k, v in merged.items() if v is not None or k in ("poll",)}
    for name in ("state_dir", "audit_log"):
        values.setdefault(name, Path())
    return Settings(**values), bool(ns.print_config)


def _cmd_run(argv: list[str]) -> int:
    settings, print_only = build_settings(argv)
    if print_only:
        print(json.dumps(settings.as_dict(), indent=2))
        return 0
    from ckpt_watchd.service import run_daemon

    return run_daemon(settings)


# ---------------------------------------------------------------------------- one-shot commands


_human = display.size
# what one file may take in the one-shot commands (the daemon has --job-timeout)
DEFAULT_TIMEOUT = 1800.0


def outcome_line(o: Any) -> str:
    """One line per file or folder, whatever its name or error contains."""
    path = display.printable(o.path)
    if o.status == "failed":
        return f"{path}: failed: {display.printable(o.error)}"
    if o.status == "skipped":
        return f"{path}: skipped ({display.printable(o.reason)})"
    if o.status == "incomplete":
        return f"{path}: incomplete, left as it is ({display.printable(o.reason)})"
    verb = "would strip" if o.status == "would_strip" else "stripped"
    approx = "~" if o.status == "would_strip" else ""
    target = f" -> {display.printable(o.output)}" if o.output else ""
    note = f"; {display.printable(o.reason)}" if o.reason else ""
    return (f"{path}: {verb} ({o.profile}) {_human(o.bytes_before)} -> "
            f"{approx}{_human(o.bytes_after)}{target}{note}")


def _timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="wall-clock seconds one file may take before its process is killed "
                   f"(default: {DEFAULT_TIMEOUT:g}); each file also has a CPU budget")


def _cmd_scan(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ckpt-watchd scan",
        description="How much would a strip give back, and from which runs? Changes nothing; "
        "needs no daemon.")
    p.add_argument("root", type=Path, metavar="DIR", help="the runs folder to look at")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    defaults = Settings(root=Path("."))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes for the estimates (default: one per CPU)")
    p.add_argument("--settle", type=float, default=defaults.settle, metavar="SECONDS",
                   help=f"as the daemon's --settle (default: {defaults.settle:g})")
    for name, meta, what in (("pattern", "GLOB", "weights folders"), ("files", "GLOB",
                             "checkpoint names"), ("exclude", "GLOB", "run folders to leave out")):
        default = list(getattr(defaults, name))
        p.add_argument(f"--{name}", action="append", default=None, metavar=meta,
                       help=f"as the daemon's --{name}: {what} (repeatable; default: "
                       f"{_fmt(default) or 'none'})")
    p.add_argument("--max-depth", type=int, default=defaults.max_depth, metavar="N",
                   help=f"as the daemon's --max-depth (default: {defaults.max_depth})")
    _timeout(p)
    ns = p.parse_args(argv)
    root = ns.root.absolute()
    if not root.is_dir():
        raise StartupError(f"{ns.root}: not a directory")
    s = Settings(root=root, pattern=tuple(ns.pattern or defaults.pattern),
                 files=tuple(ns.files or defaults.files), exclude=tuple(ns.exclude or ()),
                 max_depth=ns.max_depth, settle=ns.settle,
                 workers=max(1, ns.workers))
    from ckpt_watchd.ops import scan
    from ckpt_watchd.ops.progress import Progress
    from ckpt_watchd.watch import discover

    where = discover.Where(s.root, s.pattern, s.files, skip=(s.state_dir,), max_depth=s.max_depth)
    rows = scan.scan(where, workers=s.workers, settle=s.settle, exclude=s.exclude,
                     progress=Progress(), wall=ns.timeout)
    scan.print_scan(rows, as_json_out=ns.json)
    return 0


def _cmd_strip(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ckpt-watchd strip",
                                description="Strip checkpoints now, in place and atomically.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("-o", "--output", type=Path, help="write the result here (one input only); "
                   "the input is left untouched")
    p.add_argument("--dry-run", action="store_true", help="say what would happen, change nothing")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--half", action="store_true",
                   help="generic checkpoints: also cast weights to FP16 (YOLO profiles always do)")
    _timeout(p)
    ns = p.parse_args(argv)
    if ns.output is not None and len(ns.paths) != 1:
        p.error("-o/--output takes exactly one input PATH")
    if not ns.timeout > 0:
        p.error("--timeout must be > 0")
    from ckpt_watchd.engine import atomic
    from ckpt_watchd.ops.progress import Progress
    from ckpt_watchd.worker import StripJob, run_isolated

    folders = {p for p in ns.paths if p.is_dir() and not p.is_symlink()}
    if ns.output is not None and folders:
        p.error("-o/--output writes one file: a checkpoint folder is stripped in place")
    if len(ns.paths) > 1:
        # each file is handled in a process of its own, forked from this one: import the torch
        # side once here instead of once per file (a single file is refused before torch)
        from ckpt_watchd.engine import checkpoint  # noqa: F401

    sizes = {p: _size_of(p) for p in ns.paths}
    progress = Progress(enabled=None if len(ns.paths) > 1 or max(sizes.values()) > _BIG
                        else False)
    progress.start(len(ns.paths), "stripping")
    failed = False
    for path in ns.paths:
        dest = ns.output if ns.output is not None else path

        def tick(path: Path = path, dest: Path = dest) -> None:
            written = atomic.temp_bytes(dest)
            progress.note(f"{display.printable(path.name)}: {_human(written)} written"
                          if written else f"{display.printable(path.name)}")

        job = StripJob(path=str(path), kind="folder" if path in folders else "file",
                       output=str(ns.output) if ns.output else None, dry_run=ns.dry_run,
                       half=ns.half)
        outcome = run_isolated(job, wall=ns.timeout, tick=tick if progress.on else None)
        failed |= not outcome.ok
        progress.advance()
        progress.print(json.dumps(outcome.to_dict()) if ns.json else outcome_line(outcome))
    progress.done()
    return 1 if failed else 0


_BIG = 1 << 30  # one file this large gets a progress display of its own


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cmd_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ckpt-watchd inspect",
                                description="Where do a checkpoint's bytes go?")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _timeout(p)
    ns = p.parse_args(argv)
    if ns.path.is_dir() and not ns.path.is_symlink():
        return _inspect_folder(ns.path, as_json=ns.json)
    from ckpt_watchd.worker import inspect_isolated

    report, error = inspect_isolated(ns.path, wall=ns.timeout)
    if error is not None or report is None:
        print(f"{display.printable(ns.path)}: failed: {display.printable(error)}",
              file=sys.stderr)
        return 1
    assert report is not None
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_inspection(report))
    return 0


def _inspect_folder(path: Path, *, as_json: bool) -> int:
    """A checkpoint folder: nothing is unpickled, so no worker process is needed."""
    from ckpt_watchd.engine import folder
    from ckpt_watchd.errors import CheckpointError

    try:
        r = folder.inspect_folder(path)
    except (CheckpointError, OSError) as e:
        print(f"{display.printable(path)}: failed: {display.printable(e)}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(r, indent=2))
        return 0
    lines = [f"{display.printable(r['path'])}: {_human(r['bytes'])}, a checkpoint folder, "
             f"trainer: {r['profile']}"]
    for group, what in (("remove", "removed by a strip"), ("keep", "kept byte-identical"),
                        ("unknown", "kept, of unknown purpose")):
        for f in r[group]:
            lines.append(f"  {display.printable(f['name']):<40} {_human(f['bytes']):>10}  {what}")
    if r["unsupported"] or r["incomplete"]:
        why = (f"not supported: {r['unsupported']}" if r["unsupported"]
               else f"incomplete: {r['incomplete']}")
        lines.append(f"  not strippable: {display.printable(why)}; a strip leaves it as it is")
    elif not r["remove"]:
        lines.append("  already stripped: no optimizer-side file left")
    else:
        lines.append(f"  after a strip: {_human(r['bytes_after_strip'])} "
                     f"(saves {_human(r['bytes'] - r['bytes_after_strip'])})")
    print("\n".join(lines))
    return 0


def format_inspection(r: dict[str, Any]) -> str:
    lines = [f"{display.printable(r['path'])}: {_human(r['bytes'])}, {r['format']} format, "
             f"trainer: {r['profile'] or 'unrecognised'}"
             + (f", epoch {r['epoch']}" if r.get("epoch") is not None else "")]
    width = max([len(display.printable(k["key"])) for k in r["keys"]] + [3])
    lines.append(f"  {'key':<{width}}  {'type':<40} {'tensors':>7} {'bytes':>12}  dtypes")
    for k in r["keys"]:
        lines.append(f"  {display.printable(k['key']):<{width}}  {k['type'][:40]:<40} {k['tensors']:>7} "
                     f"{k['bytes']:>12}  {','.join(k['dtypes'])}")
    if r["stripped"] is None:
        lines.append(f"  not strippable: {r.get('note')}")
    elif r["stripped"]:
        lines.append("  already stripped (epoch -1, no optimizer state)")
    else:
        saved = r["bytes"] - r["bytes_after_strip"]
        if saved > 0:
            lines.append(f"  not stripped; after a strip: ~{_human(r['bytes_after_strip'])} "
                         f"(saves ~{_human(saved)})")
        else:
            lines.append("  not stripped, but nothing to save: it holds no optimizer state")
    return "\n".join(lines)


def _cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ckpt-watchd status",
                                description="Each run the daemon knows and its state.")
    p.add_argument("--root", type=Path, required=True, metavar="DIR")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    from ckpt_watchd.ops.status import print_status

    return print_status(ns.root, ns.state_dir, as_json=ns.json)


def _cmd_restore(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ckpt-watchd restore",
                                description="Put an archived original back so the run can --resume.")
    p.add_argument("path", type=Path, metavar="PATH", help="the stripped checkpoint")
    p.add_argument("--archive-dir", type=Path, required=True, metavar="DIR")
    ns = p.parse_args(argv)
    from ckpt_watchd.records.archive import restore

    return restore(ns.path, ns.archive_dir)
