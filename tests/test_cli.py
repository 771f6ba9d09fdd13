"""The `tunesmith` command as a user runs it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUBCOMMANDS = ["train", "chat", "export", "api", "webui", "data", "env", "version"]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_top_level_help_lists_every_subcommand():
    proc = run("--help")
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    proc = run(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: tunesmith " + name in proc.stdout


def test_help_does_not_import_torch():
    code = ("import sys, tunesmith.cli as cli\n"
            "try:\n    cli.main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().endswith("torch not loaded")


# Waits half a second after the process starts, then prints the clock's figure and the time
# since the wait began (an upper bound's base: the interpreter started a little before that).
CLOCK = """
import time
begun = time.monotonic()
time.sleep(0.5)
from tunesmith.env import seconds_since_start
print(seconds_since_start(), time.monotonic() - begun)
"""


# The process's start is read from /proc; elsewhere the clock counts from tunesmith's import.
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc on this system")


@needs_proc
def test_command_clock_counts_from_the_process_start():
    proc = subprocess.run([sys.executable, "-c", CLOCK], capture_output=True, text=True, timeout=60)
    clock, since_begun = map(float, proc.stdout.split())
    assert since_begun >= 0.5
    assert since_begun <= clock <= since_begun + 1.0


@needs_proc
def test_command_clock_of_a_torchrun_worker_counts_from_its_launcher():
    # The launcher waits half a second before it starts the worker, as torchrun's own start does.
    launcher = ("import os, subprocess, sys, time\n"
                "time.sleep(0.5)\n"
                "env = dict(os.environ, TORCHELASTIC_RUN_ID='test')\n"
                "worker = 'from tunesmith.env import seconds_since_start; print(seconds_since_start())'\n"
                "subprocess.run([sys.executable, '-c', worker], env=env, check=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    proc = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) >= 0.5


# Runs `tunesmith version` through cli.main, as the process's own command line or called from
# it with other arguments, and reports whether full garbage collections were spaced out and the
# heap frozen for the exit; an atexit handler registered before must still run, after everything
# the command printed.
EXIT = """
import atexit, gc, sys
import tunesmith.cli as cli
atexit.register(lambda: print("atexit ran", flush=True))
own = sys.argv[1] == "own"
sys.argv = ["tunesmith", "version"] if own else ["a", "longer", "process"]
before = gc.get_threshold()
code = cli.main(None if own else ["version"])
after = gc.get_threshold()
print(f"full collections after {after[2]}" if after != before else "collections as before")
print("frozen" if gc.get_freeze_count() else "not frozen", flush=True)
raise SystemExit(code)
"""


@pytest.mark.parametrize("own", [True, False])
def test_only_a_process_own_command_changes_its_garbage_collection_and_atexit_still_runs(own):
    proc = subprocess.run([sys.executable, "-c", EXIT, "own" if own else "called"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tunesmith ")
    assert lines[1:] == ["full collections after 1000" if own else "collections as before",
                         "frozen" if own else "not frozen", "atexit ran"]


def test_version_and_keys():
    assert run("version").stdout.startswith("tunesmith ")
    proc = run("train", "--keys")
    assert proc.returncode == 0 and "learning_rate" in proc.stdout and "lora_target" in proc.stdout


def test_no_command_prints_help_and_exits_2():
    proc = run()
    assert proc.returncode == 2 and "COMMAND" in proc.stdout


def test_user_error_is_printed_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: identity\nlearning_rat: 1\n")
    proc = run("train", str(cfg))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "did you mean 'learning_rate'" in proc.stderr


def test_missing_config_file():
    proc = run("train", "/nonexistent/cfg.yaml")
    assert proc.returncode == 1 and "config file not found" in proc.stderr


def test_overrides_after_options(tmp_path, repo_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: identity\ndataset_dir: {repo_data}\n")
    proc = run("data", "preview", str(cfg), "-n", "1", "--no-color", "cutoff_len=4096")
    assert proc.returncode == 0, proc.stderr
    assert "[[" in proc.stdout


def test_data_templates_lists_named_templates():
    proc = run("data", "templates")
    assert proc.returncode == 0
    for name in ("chatml", "qwen", "llama3", "mistral", "gemma", "alpaca", "empty"):
        assert name in proc.stdout.split()


def test_env_reports_versions():
    proc = run("env")
    assert proc.returncode == 0
    assert "torch" in proc.stdout and "transformers" in proc.stdout
