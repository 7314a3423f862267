"""Facts about the machine a benchmark ran on, and the commit it measured, for every result JSON.

The benchmark scripts in this folder import it as `machine` (run directly, Python puts the
script's folder on sys.path; `ember bench` puts it there too). GPU facts come from nvidia-smi,
and torch's versions are added when the benchmark has imported torch already.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_GPU_QUERY = (
    "name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max,clocks.max.sm,"
    "power.limit"
)


def git_sha() -> str:
    """HEAD of the checkout, or $EMBER_GIT_SHA (a copy of the tree without .git, e.g. on a GPU
    host the tree was sent to)."""
    if os.environ.get("EMBER_GIT_SHA"):
        return os.environ["EMBER_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def machine_facts(path: str | Path = ROOT) -> dict[str, Any]:
    """CPU, memory, the disk holding `path`, kernel, transparent huge pages, load average, and
    the GPU where there is one."""
    disk = shutil.disk_usage(path)
    dev = subprocess.run(
        ["df", "--output=source,fstype", str(path)], capture_output=True, text=True
    )
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "disk": " ".join(dev.stdout.split()[2:]) or "unknown",
        "disk_total_gib": round(disk.total / 2**30, 1),
        "disk_free_gib": round(disk.free / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "thp": _THP.read_text().strip() if _THP.exists() else "n/a",
        "load_average_at_start": os.getloadavg()[0],
        **gpu_facts(),
    }


def gpu_facts() -> dict[str, Any]:
    """Each GPU as nvidia-smi names it (nothing without nvidia-smi), and torch's CUDA build."""
    if shutil.which("nvidia-smi") is None:
        return {}
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={_GPU_QUERY}", "--format=csv,noheader"],
        capture_output=True, text=True,
    )  # fmt: skip
    facts: dict[str, Any] = {
        "gpus": [line.strip() for line in out.stdout.splitlines() if line.strip()],
        "gpu_fields": _GPU_QUERY,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
    return facts


def stamp(benchmark: str) -> dict[str, Any]:
    """The head of every result JSON: the benchmark's name, the commit, when (UTC) and where."""
    return {
        "benchmark": benchmark,
        "git_sha": git_sha(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_facts(),
    }
