"""Training runs launched from the web UI: `tunesmith train <yaml>` subprocesses, watched through files.

Everything about a run lives in its output_dir (docs/ARCHITECTURE.md, "The run folder"), so a reloaded page, a
second browser tab or a restarted server finds it again: the YAML it was started with, the captured console
output, and a small state file holding the process id and, once known, the exit code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

CONFIG_FILE = "webui_train.yaml"  # the config the run was started with
CONSOLE_FILE = "webui_train.log"  # everything the subprocess printed
STATE_FILE = "webui_run.json"  # pid, start time, exit code

ACTIVE_STATES = ("starting", "running", "stopping")


def run_dir(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser().resolve()


@dataclass
class RunStatus:
    """What a run is doing, read from its files; `state` is one of idle, starting, running,
    stopping, finished, stopped, failed, ended."""

    output_dir: Path
    state: str = "idle"
    step: int | None = None
    total_steps: int | None = None
    elapsed: float | None = None
    eta: float | None = None
    loss: float | None = None
    returncode: int | None = None
    error: str | None = None  # the CLI's own error text, or the traceback tail of a crash
    train_points: list[tuple[int, float]] = field(default_factory=list)
    eval_points: list[tuple[int, float]] = field(default_factory=list)
    results: dict[str, Any] | None = None
    checkpoint: str | None = None  # the newest checkpoint of a stopped run: where `resume_from_checkpoint` goes on

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def summary(self) -> str:
        """One Markdown paragraph for people: state, progress, timing, and the error if any."""
        head = {
            "idle": f"No run in `{self.output_dir}` yet.",
            "starting": "**Starting**: reading the data and loading the model…",
            "running": "**Running**",
            "stopping": "**Stopping** (SIGINT sent)…",
            "finished": "**Finished**",
            "stopped": "**Stopped** before the end",
            "failed": f"**Failed** (exit code {self.returncode})",
            "ended": "**Ended** (exit status unknown: the run was started by an earlier server)",
        }[self.state]
        parts = [head]
        if self.step is not None and self.total_steps:
            parts.append(f"step {self.step} / {self.total_steps} ({100 * self.step / self.total_steps:.0f}%)")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.elapsed is not None:
            parts.append(f"elapsed {_clock(self.elapsed)}")
        if self.eta is not None and self.state in ("running", "stopping"):
            parts.append(f"ETA {_clock(self.eta)}")
        if self.results and self.state == "finished":
            runtime = self.results.get("train_runtime")
            if runtime is not None:
                parts.append(f"runtime {_clock(float(runtime))}")
        if self.state == "stopped":
            parts.append(f"resumable from {self.checkpoint}" if self.checkpoint else "no checkpoint was written")
        text = " · ".join(parts)
        if self.state not in ("idle",):
            text += f"  \n`{self.output_dir}`"
        return text


def _clock(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _is_training_process(pid: int) -> bool:
    """True while `pid` is alive and still a tunesmith process (pids are reused by the system)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid
    if not cmdline:
        return False  # a zombie: it has exited
    return b"tunesmith" in cmdline


def console_text(output_dir: Path, max_lines: int = 200) -> str:
    """The last lines the run printed, as a terminal shows them: a progress bar redraws its line
    with carriage returns, so only the last redraw of each line is kept."""
    path = output_dir / CONSOLE_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256_000))
            raw = fh.read()
    except OSError:
        return ""
    lines = []
    for line in raw.decode("utf-8", errors="replace").split("\n"):
        shown = [seg for seg in line.split("\r") if seg.strip()]
        lines.append(shown[-1] if shown else "")
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines[-max_lines:])


def follow_command(args: list[str], working: str) -> Iterator[tuple[str, str, int | None]]:
    """Run `tunesmith ARGS` and yield (console so far, `working`, None) as it prints, then
    (console, "", exit code). If the page goes away first, the command finishes on its own."""
    process = subprocess.Popen([sys.executable, "-m", "tunesmith", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n").split("\r")[-1])
            yield "\n".join(lines[-200:]), working, None
    finally:
        if process.poll() is None:
            threading.Thread(target=process.wait, daemon=True).start()
    yield "\n".join(lines), "", process.wait()


def error_block(exc: UserError | str) -> str:
    """An error as the CLI prints it, in a code block so its layout survives."""
    text = exc if isinstance(exc, str) else f"error: {exc}"
    return f"```text\n{text.replace('```', '` ` `')}\n```"


def error_text(console: str) -> str | None:
    """The error the CLI printed (`error: ...` and its hint), else the tail of a traceback."""
    lines = console.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        return "\n".join(lines[starts[-1]:]).strip()
    trace = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if trace:
        return "\n".join(lines[trace[-1]:][-20:]).strip()
    return None


def read_status(output_dir: str | Path, process: subprocess.Popen | None = None) -> RunStatus:
    """The status of the run in output_dir, from its files (and the process, when this server started it)."""
    out = run_dir(output_dir)
    status = RunStatus(out)
    state = _read_json(out / STATE_FILE)
    started = float(state.get("started", 0.0)) if state else 0.0
    log_path = out / "trainer_log.jsonl"
    # A trainer_log.jsonl older than this start belongs to an earlier run that may yet be replaced.
    if log_path.is_file() and log_path.stat().st_mtime >= started - 1:
        from tunesmith.train.logs import read_log

        try:
            entries = read_log(log_path)
        except ValueError:  # a line being written right now
            entries = []
        for entry in entries:
            if isinstance(entry.get("loss"), int | float):
                status.train_points.append((int(entry["step"]), float(entry["loss"])))
            if isinstance(entry.get("eval_loss"), int | float):
                status.eval_points.append((int(entry["step"]), float(entry["eval_loss"])))
            if "total_steps" in entry:
                status.step, status.total_steps = int(entry["step"]), int(entry["total_steps"])
                status.elapsed = entry.get("elapsed")
                eta = entry.get("eta")
                status.eta = float(eta) if isinstance(eta, int | float) else None
                status.loss = entry.get("loss")
    results_path = out / "train_results.json"
    if results_path.is_file() and results_path.stat().st_mtime >= started - 1:
        status.results = _read_json(results_path)

    if state is None:
        # Not started from the web UI; a run from the command line can still be watched.
        if status.results is not None:
            status.state = "finished"
        elif status.train_points:
            status.state = "running"
        return status

    if process is not None:
        # Our own child: its waiter thread sets returncode the moment it is reaped (poll() would
        # race with that thread's wait()).
        returncode = process.returncode
        alive = returncode is None
    else:
        returncode = state.get("returncode")
        alive = returncode is None and _is_training_process(int(state["pid"]))
    if alive:
        status.state = "stopping" if state.get("stop_requested") else (
            "running" if status.step is not None else "starting")
        if status.state == "running" and status.elapsed is not None:
            # Between log lines the clock keeps going: count from the line's own time.
            since = time.time() - log_path.stat().st_mtime
            status.elapsed += since
            if status.eta is not None:
                status.eta = max(0.0, status.eta - since)
        return status
    status.returncode = returncode
    if returncode == 0 or (returncode is None and status.results is not None):
        status.state = "finished"
    elif returncode is None:
        status.state = "ended"
    elif state.get("stop_requested"):
        status.state = "stopped"
    else:
        status.state = "failed"
    if status.state in ("failed", "stopped", "ended"):
        status.error = error_text(console_text(out))
    if status.state == "stopped":
        from tunesmith.run_folder import list_checkpoints

        saved = list_checkpoints(out)
        status.checkpoint = saved[-1][1].name if saved else None
    return status


class RunManager:
    """The runs this server started; at most one active run per output_dir."""

    def __init__(self) -> None:
        self._processes: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.latest: Path | None = None  # the last run started here: what a reloaded page shows

    def status(self, output_dir: str | Path) -> RunStatus:
        out = run_dir(output_dir)
        return read_status(out, self._processes.get(out))

    def start(self, output_dir: str | Path, config_yaml: str) -> Path:
        """Write the config into output_dir and launch `tunesmith train` on it; returns output_dir."""
        out = run_dir(output_dir)
        with self._lock:
            if self.status(out).active:
                raise UserError(f"a run is already in progress in {out}.",
                                hint="stop it first, or choose another output_dir.")
            out.mkdir(parents=True, exist_ok=True)
            config_path = out / CONFIG_FILE
            config_path.write_text(config_yaml, encoding="utf-8")
            # Validate here too, so a bad config is reported at once, worded as `tunesmith train` words it.
            from tunesmith.config import load_config

            load_config(config_path)
            command = [sys.executable, "-m", "tunesmith", "train", str(config_path)]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(out / CONSOLE_FILE, "wb") as console:
                console.write(f"$ tunesmith train {config_path}\n".encode())
                console.flush()
                # A session of its own: Ctrl-C on the web UI's terminal does not reach the run.
                process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            _write_json(out / STATE_FILE, {"pid": process.pid, "started": time.time(), "command": command,
                                           "returncode": None, "stop_requested": False})
            self._processes[out] = process
            self.latest = out
        threading.Thread(target=self._wait, args=(out, process), daemon=True,
                         name=f"tunesmith-run-{process.pid}").start()
        return out

    def _wait(self, out: Path, process: subprocess.Popen) -> None:
        returncode = process.wait()
        state = _read_json(out / STATE_FILE) or {}
        if state.get("pid") == process.pid:
            state.update(returncode=returncode, ended=time.time())
            _write_json(out / STATE_FILE, state)

    def stop(self, output_dir: str | Path) -> RunStatus:
        """Ask the run for a clean stop: SIGINT, as Ctrl-C in a terminal (finish the step, checkpoint, exit)."""
        out = run_dir(output_dir)
        status = self.status(out)
        if not status.active:
            return status
        state = _read_json(out / STATE_FILE) or {}
        state["stop_requested"] = True
        _write_json(out / STATE_FILE, state)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(state["pid"]), signal.SIGINT)
        return self.status(out)
