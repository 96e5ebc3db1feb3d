"""The report folder shared by parity sessions: a lock, one staging folder per session, merged files.

    folder = ReportFolder(Path("results_fv/antonym/fixed_trials_antonym_t10_s10_seed0"), session_id())
    with folder.locked():
        folder.stage(report_dict, stage_rows, pages, log_lines)
        merged = folder.merged()            # this session's data plus every other staged session's
        if merged.report["complete"]:
            folder.replace({"parity_suite_report.json": text, ...})

Two ``pytest parity_tests`` sessions with the same dataset and trials write the
same folder. Each keeps its own data in ``.sessions/<pid>-<token>/`` and, under
an exclusive lock on ``.lock``, merges the union of all staged sessions, so
neither loses the other's results. The union is complete only when every merged
session is, and only a complete union replaces the shared files (the caller's
rule, :meth:`fvkit.parity.report.ReportState.write`): the last session to
complete writes them for all. A session's first write, when no
other session is alive, clears what earlier finished sessions staged: a new run
starts a fresh report, as a single session always did. A session that records
nothing (one that stops on a bad option) never touches the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fvkit.processes import pid_alive
from fvkit.signals import signals_held


SESSIONS_DIR = ".sessions"
LOCK_NAME = ".lock"
#: One staged session's files.
STAGED_REPORT = "report.json"
STAGED_ROWS = "stage_rows.json"
STAGED_PAGES = "pages.json"
STAGED_LOG = "log.json"


def session_id() -> str:
    """The writing process's pid (to tell live sessions from finished ones) and a random tag."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _alive(sid: str) -> bool:
    try:
        pid = int(sid.split("-", 1)[0])
    except ValueError:
        return False
    return pid_alive(pid)


def _atomic_text(path: Path, text: str) -> None:
    from fvkit.method.data import atomic_write_text

    atomic_write_text(path, text)


@dataclass
class Merged:
    """The union of every staged session: what the shared files are written from."""

    report: dict
    rows: list = field(default_factory=list)
    pages: dict = field(default_factory=dict)
    log: list = field(default_factory=list)


def merge_reports(own: dict, others: list) -> dict:
    """``own`` with the models, summaries and notes of ``others`` (sessions' report dicts) added.

    A model both ran keeps this session's entry. The merge is complete only when
    every session is, since a still-running session's gates are not all in yet.
    """
    if not others:
        return own
    merged = dict(own)
    models, summary, notes = {}, {}, []
    for report in others + [own]:
        models.update(report.get("models") or {})
        summary.update(report.get("summary") or {})
        notes += [n for n in report.get("notes") or [] if n not in notes]
    merged["models"], merged["summary"], merged["notes"] = models, summary, notes
    merged["complete"] = all(r.get("complete") for r in others + [own])
    merged["sessions"] = len(others) + 1
    settings = dict(own.get("settings") or {})
    listed = []
    for report in others + [own]:
        listed += [m for m in (report.get("settings") or {}).get("models", []) if m not in listed]
    if listed:
        settings["models"] = listed
    merged["settings"] = settings
    return merged


class ReportFolder:
    def __init__(self, out_dir: Path, sid: str):
        self.out_dir = Path(out_dir)
        self.sid = sid
        self.staging = self.out_dir / SESSIONS_DIR / sid
        self._fresh_checked = False

    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock on the folder, held while the shared files are read and rewritten."""
        try:
            import fcntl
        except ImportError:  # not POSIX: sessions are not serialised, each still stages its own data
            self.out_dir.mkdir(parents=True, exist_ok=True)
            yield self
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOCK_NAME, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _other_sessions(self) -> list:
        root = self.out_dir / SESSIONS_DIR
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name != self.sid)

    def _clear_finished_sessions(self) -> None:
        """On a session's first write: with no other session alive, earlier sessions are history."""
        if self._fresh_checked:
            return
        self._fresh_checked = True
        others = self._other_sessions()
        if not any(_alive(p.name) for p in others):
            for p in others:
                shutil.rmtree(p, ignore_errors=True)

    def stage(self, report: dict, rows: list, pages: dict, log: list) -> None:
        """Keep this session's data where other sessions merge it from (call under the lock)."""
        self._clear_finished_sessions()
        self.staging.mkdir(parents=True, exist_ok=True)
        for name, obj in ((STAGED_ROWS, rows), (STAGED_PAGES, pages), (STAGED_LOG, log), (STAGED_REPORT, report)):
            _atomic_text(self.staging / name, json.dumps(obj, default=str))

    def _read_staged(self, folder: Path):
        try:
            return {name: json.loads((folder / name).read_text())
                    for name in (STAGED_REPORT, STAGED_ROWS, STAGED_PAGES, STAGED_LOG)}
        except (OSError, ValueError):
            return None  # a session that crashed before staging all files contributes nothing

    def merged(self) -> Merged:
        """This session's staged data plus every other staged session's (call under the lock)."""
        own = self._read_staged(self.staging)
        others = [s for s in (self._read_staged(p) for p in self._other_sessions()) if s is not None]
        others.sort(key=lambda s: str(s[STAGED_REPORT].get("started")))
        own_models = set(own[STAGED_REPORT].get("models") or {})
        rows, pages, log = [], {}, []
        for staged in others:
            mine = set(staged[STAGED_REPORT].get("models") or {}) - own_models
            rows += [r for r in staged[STAGED_ROWS] if r.get("model") in mine]
            pages.update({m: p for m, p in staged[STAGED_PAGES].items() if m in mine})
            log += staged[STAGED_LOG]
        rows += own[STAGED_ROWS]
        pages.update(own[STAGED_PAGES])
        log += own[STAGED_LOG]
        report = merge_reports(own[STAGED_REPORT], [s[STAGED_REPORT] for s in others])
        return Merged(report=report, rows=rows, pages=pages, log=log)

    def replace(self, files: dict) -> list:
        """Rewrite the shared files as one set (call under the lock).

        Every file is written in full beside its target first; then the renames run
        with SIGINT and SIGTERM held back, so Ctrl-C or ``kill`` leaves the old set
        or the new one, never a mix (a SIGKILL between two renames still can).
        """
        temps = {}
        try:
            for name, text in files.items():
                temp = self.out_dir / f".{name}.{self.sid}.tmp"
                temp.write_bytes(text.encode("utf-8"))
                temps[name] = temp
            with signals_held():
                for name, temp in temps.items():
                    os.replace(temp, self.out_dir / name)
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
        return [self.out_dir / name for name in files]
