"""The worker pool: a pooled worker warms up on a thread that ends, so no OpenMP thread team of
the warm-up stays in the process beside the one the engine's thread starts (a 2-thread engine
served 82-84% of its in-process throughput while the warm-up's team stayed; docs/serving.md);
pooled instances pack bf16 weights by default."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(2)
    from ember.cluster.worker_pool import _warm_on_a_thread_of_its_own
    from ember.store.warmup import warm_engine_process

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def tasks_after(want, timeout_s=5.0):  # an ended thread's team exits a moment after it
        deadline = time.monotonic() + timeout_s
        while tasks() != want and time.monotonic() < deadline:
            time.sleep(0.02)
        return tasks()

    before = tasks()
    _warm_on_a_thread_of_its_own("cpu")
    after_own_thread = tasks_after(before)
    warm_engine_process("cpu")  # on this thread: its team stays
    time.sleep(0.5)
    after_main_thread = tasks()
    print(before, after_own_thread, after_main_thread)
    """
)


def test_the_warm_up_leaves_no_openmp_team_behind() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    before, after_own_thread, after_main_thread = map(int, out.stdout.split()[-3:])
    assert after_own_thread == before
    assert after_main_thread > before  # the same warm-up on the main thread keeps its team


def test_pooled_instances_pack_their_weights_unless_told_not_to(tmp_path: Path) -> None:
    from ember.cluster.node_services import NodeServicesConfig

    assert NodeServicesConfig.from_env(str(tmp_path), {}).pack_weights is True
    for off in ("0", "false", ""):
        env = {"EMBER_POOL_PACK_WEIGHTS": off}
        assert NodeServicesConfig.from_env(str(tmp_path), env).pack_weights is False
