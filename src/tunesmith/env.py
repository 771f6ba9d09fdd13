"""The machine a command runs on: versions, devices and CPU features (`tunesmith env`), the
per-thread float settings training uses, and how long ago the command started."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith import IMPORTED, __version__
from tunesmith.cpu import cpu_plan, detect

if TYPE_CHECKING:
    import torch


def flush_denormals() -> None:
    """Treat subnormal floats as zero in this thread and the threads it starts later.

    Softmax tails and small gradients produce subnormals, which the CPU computes on a slow path:
    a training step measured 4% (fp32) to 12% (bf16) faster with them flushed (bench/RESULTS.md),
    and values below 1e-38 carry nothing a weight update can use. Call it before torch starts its
    worker threads: they inherit the setting of the thread that creates them.
    """
    import torch

    torch.set_flush_denormal(True)


def seconds_since_start() -> float:
    """Seconds since the command started: its process's start (Linux), so that starting the
    interpreter and the imports before the run's own code count too (1.3-2.2 s on a 2-core CPU).

    A torchrun worker counts from its launcher, the process the command started: the relaunch in
    train/distributed.py becomes torchrun in place, and a worker restarted after a failure counts
    the failed attempt too. Where /proc cannot be read: since tunesmith was first imported.
    """
    since_import = time.monotonic() - IMPORTED
    # Set by torchrun for its workers; a launcher that died leaves the worker to init (pid 1).
    launched = "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != 1
    since_start = _process_age(os.getppid() if launched else os.getpid())
    # The process began before tunesmith was imported: a smaller figure is a misreading.
    return since_start if since_start is not None and since_start >= since_import else since_import


def _process_age(pid: int) -> float | None:
    """Seconds since process `pid` started, from /proc (Linux, 10 ms steps); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The boot clock the start field counts on (/proc/uptime is faked in some containers).
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
        # Field 22 is the start in clock ticks after boot; the fields are counted from the end of
        # field 2, the program's name, which may hold spaces and parentheses.
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bfloat16 compute is fast and exact on `device`: CUDA by its own check; on CPU only
    with native bf16 instructions (AVX512_BF16 or AMX), elsewhere it is emulated and slow."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return detect().native_bf16
    return False


def environment_report() -> str:
    """Versions, devices and CPU features: what a bug report needs (`tunesmith env`)."""
    import platform

    import torch

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"tunesmith: {__version__}", f"python: {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}"]
    lines += [f"{pkg}: {version(pkg)}" for pkg in ("torch", "transformers", "peft", "accelerate")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device: cuda x{torch.cuda.device_count()} ({names}); CUDA {torch.version.cuda}")
        lines.append(f"bf16: {'yes' if bf16_supported('cuda') else 'no'} (cuda)")
    else:
        lines.append("device: cpu")
    lines += cpu_report()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"cpu cores usable: {cores}; torch threads: {torch.get_num_threads()} "
                 f"(inter-op {torch.get_num_interop_threads()})")
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "MKL_", "KMP_"))}
    lines.append("thread env: " + (" ".join(f"{k}={v}" for k, v in env.items()) or "none set"))
    return "\n".join(lines)


def cpu_report() -> list[str]:
    """The CPU, its features, and the kernels a run would use on it in fp32 and in bf16, each with
    its reason."""
    found = detect()
    plans = {dtype: cpu_plan(found, dtype) for dtype in ("fp32", "bf16")}
    vector = sorted(f for f in found.flags if f.startswith(("avx512", "amx")))
    lines = [f"cpu: {found.describe()}; torch uses {found.torch_capability}",
             f"cpu flags: {' '.join(vector) or 'no AVX-512/AMX'}",
             f"bf16 on cpu: {'yes' if found.native_bf16 else 'no (emulated, slow)'}, {plans['bf16'].bf16.value}"]
    said: set[str] = set()
    for dtype, plan in plans.items():
        lines.append(f"cpu kernels in {dtype}: {plan.summary()}")
        for name, choice in plan.choices().items():
            if choice.reason not in said:  # the bf16 plan repeats some of fp32's
                said.add(choice.reason)
                lines.append(f"  {name}: {choice.reason}")
    return lines
