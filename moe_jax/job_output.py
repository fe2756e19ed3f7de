"""The output file of a JSONL job and its sidecars: appending completions so that a crash leaves only
whole lines, reading the finished ones back to resume, `OUT.meta.json` (the settings a resume must
match, and a digest of each request, which a finished one must match), `OUT.errors.jsonl` (the input lines
skipped as invalid) and `OUT.lock` (held by the run writing OUT)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from moe_jax.job_requests import JobRequest

log = logging.getLogger("moe_jax")


class ResumeError(ValueError):
    """An output file this run cannot resume."""


class OutputError(ValueError):
    """An output file this run cannot write: another run holds it, or its directory is not writable."""


SIDECARS = (".meta.json", ".meta.json.tmp", ".errors.jsonl", ".lock")  # the files a job writes beside OUT


def sidecar(out: Path, suffix: str) -> Path:
    """out.jsonl -> out<suffix>, e.g. out.meta.json."""
    return out.with_name(out.stem + suffix)


def _dumps(record: dict) -> str:
    """One JSON line. A non-finite float (a NaN logprob of a model whose logits are NaN) is written as null:
    JSON has no NaN, and a line that other readers reject would be as good as lost."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_finite(record), ensure_ascii=False) + "\n"


def _finite(v):
    """`v` with every non-finite float replaced by None, through dicts and lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Holds OUT.lock (an exclusive `flock`) while a job runs, so that a second run on the same OUT fails at once
    (OutputError) rather than append the same requests again or replace the file the first is writing; taken
    before anything is read or written, it also finds an OUT that cannot be written before the model loads. The
    file holds the holder's pid and is removed when the job ends."""
    path = sidecar(out, ".lock")
    while True:
        try:
            f = open(path, "a+", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"--output {out}: cannot write in {out.resolve().parent} ({e.strerror or e})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise OutputError(f"--output {out} is being written by another run (pid {holder}, which holds {path}): "
                              f"wait for it to end, or give another --output") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a lost mount) as an OutputError naming it."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e


class CompletionWriter:
    """Writes one JSON line per record, handed to the OS whole (a killed process leaves whole lines);
    fsync at most every `sync_every_s` and at close. path None: stdout, never synced. A failed write raises
    OutputError."""

    def __init__(self, path: Path | None, sync_every_s: float = 0.5):
        self.path = path
        with _writing(path):
            self._f = open(path, "a", encoding="utf-8") if path else sys.stdout
        self._durable, self.sync_every_s, self._synced = path is not None, sync_every_s, time.monotonic()

    def write(self, record: dict) -> None:
        with _writing(self.path):
            self._f.write(_dumps(record))
            self._f.flush()
        if self._durable and time.monotonic() - self._synced >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        with _writing(self.path):
            os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._durable:
            try:
                self.sync()
            finally:
                with _writing(self.path):  # its flush of what a failed write left buffered may fail again
                    self._f.close()


def finished_ids(path: Path, id_key: str) -> set:
    """The request ids of the whole lines of an earlier output; a torn last line (a crash mid-write) is
    cut off the file."""
    data = path.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    ids, repeated = set(), []
    for n, line in enumerate(keep.split(b"\n")[:-1], 1):
        try:
            rid = json.loads(line)[id_key]
            if rid in ids:
                repeated.append((n, rid))
            ids.add(rid)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ResumeError(f"{path}:{n}: not an output line of this job's format; "
                              f"cannot resume into this file") from None
    if repeated:
        log.warning("%s holds %d lines whose %s an earlier line has (two runs writing it at once?), e.g. line %d "
                    "(%r): a reader should keep one line per %s", path, len(repeated), id_key, *repeated[0], id_key)
    if len(keep) < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - len(keep))
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return ids


def start_output(out: Path, meta: dict, requests: Sequence[JobRequest]) -> None:
    """A fresh job: any earlier output is removed and the job's settings and requests (`record_requests`)
    recorded in OUT.meta.json."""
    out.unlink(missing_ok=True)
    _write_meta(out, {**meta, REQUESTS: _digests(requests)})


def record_requests(out: Path, requests: Sequence[JobRequest]) -> None:
    """OUT.meta.json's record of the requests (each id with its `JobRequest.fingerprint`) replaced by
    `requests`', once a resume has checked the finished ones (`check_finished`)."""
    _write_meta(out, {**_read_meta(out), REQUESTS: _digests(requests)})


def check_finished(out: Path, input_path: Path, finished: Sequence[JobRequest]) -> None:
    """Refuses (ResumeError) to resume when the input line of a request OUT holds a result for has changed
    since (another prompt or setting under the same id: a line added above lines without ids renumbers them)."""
    recorded = _read_meta(out).get(REQUESTS)
    if recorded is None:  # started before requests were recorded
        log.warning("%s: its meta file records no requests, so whether the %d finished ones are still those of %s "
                    "is not checked", out, len(finished), input_path)
        return
    was = {rid: digest for rid, digest in recorded}
    changed = [r for r in finished if r.id in was and was[r.id] != r.fingerprint()]
    if changed:
        lines = ", ".join(f"line {r.line} (id {r.id!r})" for r in changed[:5])
        raise ResumeError(f"cannot resume {out}: {len(changed)} of its finished requests ask for something else in "
                          f"{input_path} now than when they ran (a line without an id takes its line number as its "
                          f"id), e.g. {lines}: restore those lines, or write to a new --output (--overwrite would "
                          f"drop the finished lines)")


REQUESTS = "requests"  # OUT.meta.json's key for [[id, fingerprint], ...] of the job's requests


def _digests(requests: Sequence[JobRequest]) -> list:
    return [[r.id, r.fingerprint()] for r in requests]


def _read_meta(out: Path) -> dict:
    path = sidecar(out, ".meta.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResumeError(f"cannot resume {out}: {path} is missing, so the model and sampling settings it was "
                          f"made with are unknown (--overwrite instead of --resume starts over)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ResumeError(f"cannot resume {out}: {path} is not valid JSON") from None


def _write_meta(out: Path, meta: dict) -> None:
    """OUT.meta.json replaced whole and synced: a crash leaves the old file or the new one, never a torn one
    (which would stop every later resume)."""
    tmp = sidecar(out, ".meta.json.tmp")
    with _writing(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, sidecar(out, ".meta.json"))


# Settings an OUT.meta.json may lack (written before they were recorded), as they were then (sampling keys of
# the seed alone came before 2026-11-28).
META_DEFAULTS = {"kv_cache_dtype": "auto", "logprobs": None, "sampling_keys": "seed (moe-jax before 2026-11-28)"}


def recorded_setting(out: Path, key: str):
    """The setting `key` OUT.meta.json records (None where it records none, or there is no readable meta file:
    `check_meta` then says why)."""
    try:
        return _read_meta(out).get(key)
    except ResumeError:
        return None


def check_meta(out: Path, meta: dict) -> None:
    """Refuses (ResumeError) to resume an output started with other settings than `meta` (the keys of `meta`;
    one the file lacks counts as its `META_DEFAULTS` value)."""
    old = _read_meta(out)
    was = {k: old.get(k, META_DEFAULTS.get(k)) for k in meta}
    diffs = [f"cannot resume {out}: it was started with {k} {was[k]!r}, this run has {v!r}"
             for k, v in meta.items() if was[k] != v]
    if diffs:
        hint = "resume with the settings it was started with, or write to a new --output"
        raise ResumeError("\n".join([*diffs, hint]))


def write_errors(path: Path, records: list[dict]) -> None:
    """OUT.errors.jsonl: one line per skipped input line (replaced on every run; removed when none)."""
    if records:
        path.write_text("".join(map(_dumps, records)), encoding="utf-8")
    else:
        path.unlink(missing_ok=True)
