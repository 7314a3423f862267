"""`ember bench load`: how fast checkpoints reach memory, against the disk and memory ceilings
and against the loaders people use.

On one model (default: llama `1b`, bf16, about 2.2 GB, made by the factory once under .cache/),
each measured run happens in a fresh child process after one excluded warm-up run (imports,
thread pools, a process's first allocation), cold (files dropped from the page cache with
posix_fadvise DONTNEED, residency checked with mincore and recorded) or warm (files cached).
Runs are interleaved: round r runs every loader once, so bursts of load from other processes
on a shared machine spread over all loaders. `--runs` rounds (default 3); min and median are
reported as GB/s of tensor payload. Rows:

- raw reads of the same bytes, the disk's ceiling (the best of them): O_DIRECT at queue depth
  32 (32 threads, each keeping one 4 MiB aligned read in flight, like `fio --direct=1
  --iodepth=32`) and parallel buffered reads (8 threads of 16 MiB reads, readahead on top),
  both into 2 MiB-page buffers; and the earlier rows kept for comparison, into 4 KiB-page
  buffers: buffered with one thread (16 MiB reads, like dd) and O_DIRECT with 8 threads of
  32 MiB;
- memory copy of the same bytes into already-mapped memory (the memory ceiling) and into fresh
  4 KiB pages (the page-fault ceiling);
- safetensors `load_file` + clone, `load_file` with every page touched, `torch.load(mmap=True)`
  with every page touched;
- peers from the `bench` extra: tensorizer (8 readers), fastsafetensors (no GDS), runai model
  streamer;
- ember (`ember.store.load` with defaults: host memory from the process's pool, which after the
  excluded warm-up load is recycled memory: the second and later loads of a process), ember
  into fresh memory (`reuse_host_memory=False`: 2 MiB pages the kernel zeroes first, what the
  first load of a process gets), ember with checksums verified, ember with buffered reads only.

Each row also reports CPU seconds per run (user + system, all threads): on a shared machine
wall-clock GB/s swings with other people's load, CPU cost per byte much less.

With `--device cuda` (where CUDA exists) the loads go to cuda:0 and the rows are: pinned
host-to-device bandwidth (the ceiling), the raw disk reads, safetensors `load_file(device=)` +
clone, ember with its defaults (16 reader threads on CUDA) and with 4 and 8, ember with cached
chunks copied from their registered pages (`register_cached`), ember with the checkpoint pinned
ahead (`cuda_loader.pin_checkpoint`, once per child before its loads: the pinning time is
reported as `setup_seconds`, not in the load), and each from a copy in shared memory
(`/dev/shm`, the node store's DRAM tier; warm only, tmpfs has no cold). Writes
benchmarks/results/load.json (load-cuda.json on CUDA; or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import git_sha, machine_facts

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "store"
CHUNK = 16 << 20
OWN_MEMORY_PEERS = ("tensorizer", "fastsafetensors", "runai", "safetensors_clone")
RAW = ("raw_direct", "raw_buffered", "raw_buffered_1t", "raw_direct_8t")
LOADERS = (
    *RAW,
    "safetensors_clone",
    "safetensors_touched",
    "torch_mmap_touched",
    "tensorizer",
    "fastsafetensors",
    "runai",
    "ember",
    "ember_fresh",
    "ember_verify",
    "ember_buffered",
)
# On CUDA: reader-thread counts for a many-core GPU host, and the DRAM tier as the source.
CUDA_LOADERS = (
    "raw_direct",
    "raw_buffered",
    "safetensors_clone",
    "tensorizer",
    "fastsafetensors",
    "runai",
    "ember",
    "ember_4t",
    "ember_8t",
    "ember_reg",
    "ember_dram",
    "ember_dram_reg",
    "ember_pinned",
    "ember_dram_pinned",
)
# Rows with no cold run: a tmpfs file cannot be evicted to disk, registered loads read chunks
# on disk exactly as the default does (O_DIRECT into staging), and a pinned file is in memory.
NO_COLD = ("ember_dram", "ember_reg", "ember_dram_reg", "ember_pinned", "ember_dram_pinned")
DRAM_DIR = Path("/dev/shm") / f"ember-bench-load-{os.getuid()}"
ENDS_IN = {
    "safetensors_touched": "mapped file",
    "torch_mmap_touched": "mapped file",
    **{r: "reused buffer" for r in RAW},
}
# (O_DIRECT, threads, bytes per read, 2 MiB-page buffers) of each raw row. O_DIRECT into 4 KiB
# pages measured half as fast as into 2 MiB pages here (the device maps every page of a
# request), so the ceiling rows read into 2 MiB pages, as ember does; the two earlier rows keep
# their plain buffers for comparison.
RAW_SETTINGS = {
    "raw_direct": (True, 32, 4 << 20, True),
    "raw_buffered": (False, 8, 16 << 20, True),
    "raw_buffered_1t": (False, 1, 16 << 20, False),
    "raw_direct_8t": (True, 8, 32 << 20, False),
}


# --- artifacts --------------------------------------------------------------------------------


def prepare(size: str, loaders: list[str]) -> dict[str, Any]:
    """The model in every format `loaders` read, made once and cached under .cache/store."""
    from safetensors import safe_open

    from ember.store import convert
    from ember.store.factory import make_model

    hf = CACHE / f"llama-{size}"
    if not (hf / "config.json").is_file():
        print(f"making llama {size} in {hf} ...", flush=True)
        make_model(hf, "llama", size, "bf16", seed=0)
    st_files = sorted(str(p) for p in hf.glob("*.safetensors"))
    ck = CACHE / f"llama-{size}-ember"
    if not (ck / "index.json").is_file():
        t0 = time.perf_counter()
        convert(hf, ck, progress=False, overwrite=True)
        print(f"converted to {ck} in {time.perf_counter() - t0:.1f} s", flush=True)
    pt = CACHE / f"llama-{size}.pt"
    tz = CACHE / f"llama-{size}.tensors"
    want_pt = "torch_mmap_touched" in loaders and not pt.is_file()
    want_tz = "tensorizer" in loaders and _has("tensorizer") and not tz.is_file()
    if want_pt or want_tz:
        import torch

        state = {}
        for f in st_files:
            with safe_open(f, "pt") as h:
                state.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
        if want_pt:
            torch.save(state, pt)
        if want_tz:
            from tensorizer import TensorSerializer

            s = TensorSerializer(str(tz))
            s.write_state_dict(state)
            s.close()
        del state
    payload = 0
    for f in st_files:
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118
                sl = h.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                payload += n * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
    return {
        "hf": str(hf),
        "safetensors": st_files,
        "ember": str(ck),
        "ember_files": sorted(str(p) for p in ck.glob("*.bin")),
        "pt": str(pt),
        "tensorizer": str(tz),
        "payload_bytes": payload,
    }


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def dram_copy(art: dict[str, Any]) -> str | None:
    """The ember checkpoint copied into shared memory (made once per run), or None without room."""
    dst = DRAM_DIR / Path(art["ember"]).name
    if (dst / "index.json").is_file():
        return str(dst)
    need = sum(os.path.getsize(f) for f in art["ember_files"]) + (1 << 30)
    if not DRAM_DIR.parent.is_dir() or shutil.disk_usage(DRAM_DIR.parent).free < need:
        return None
    shutil.rmtree(DRAM_DIR, ignore_errors=True)
    shutil.copytree(art["ember"], dst)
    return str(dst)


def reads_dram(loader: str) -> bool:
    """The rows that load from the shared-memory copy (`dram_copy`)."""
    return loader.startswith("ember_dram")


def files_of(loader: str, art: dict[str, Any]) -> list[str]:
    if reads_dram(loader):
        return sorted(str(p) for p in Path(art["ember_dram"]).glob("*.bin"))
    if loader.startswith("ember") or loader.startswith("raw"):
        return art["ember_files"]
    if loader == "torch_mmap_touched":
        return [art["pt"]]
    if loader == "tensorizer":
        return [art["tensorizer"]]
    return art["safetensors"]


# --- loaders (run in the child) ---------------------------------------------------------------


def touch(tensors: Any) -> int:
    """Read one byte of every 4 KiB page (what a mapped load must do before it is really in)."""
    total = 0
    for t in tensors.values():
        flat = t.reshape(-1).view(__import__("torch").uint8)
        total += int(flat[::4096].sum())
    return total


def make_loader(name: str, art: dict[str, Any], device: str) -> Callable[[], Any]:
    import torch

    if name in RAW_SETTINGS:
        direct, threads, chunk, huge = RAW_SETTINGS[name]
        return lambda: _raw_read(art["ember_files"], direct, threads, chunk, huge)
    if name == "safetensors_clone":
        from safetensors.torch import load_file

        def st_clone() -> Any:
            out = {}
            for f in art["safetensors"]:
                out.update({k: v.clone() for k, v in load_file(f, device=device).items()})
            return out

        return st_clone
    if name == "safetensors_touched":
        from safetensors.torch import load_file

        def st_touched() -> Any:
            out = {}
            for f in art["safetensors"]:
                out.update(load_file(f))
            touch(out)
            return out

        return st_touched
    if name == "torch_mmap_touched":

        def torch_mmap() -> Any:
            out = torch.load(art["pt"], mmap=True, weights_only=True)
            touch(out)
            return out

        return torch_mmap
    if name == "tensorizer":
        from tensorizer import TensorDeserializer

        def tz() -> Any:
            d = TensorDeserializer(art["tensorizer"], device=device, num_readers=8)
            out = dict(d.items())
            d.close()
            return out

        return tz
    if name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        def fst() -> Any:
            loader = SafeTensorsFileLoader(SingleGroup(), device=device, nogds=True)
            loader.add_filenames({0: art["safetensors"]})
            fb = loader.copy_files_to_device()
            out = {k: fb.get_tensor(k) for k in loader.get_keys()}
            fb.close()
            loader.close()
            return out

        return fst
    if name == "runai":
        from runai_model_streamer import SafetensorsStreamer

        def runai() -> Any:
            with SafetensorsStreamer() as s:
                s.stream_files(art["safetensors"], device=device)
                return dict(s.get_tensors())

        return runai
    if name.startswith("ember"):
        from ember.store import LoaderConfig, load

        cfg = {
            "ember": LoaderConfig(),
            "ember_fresh": LoaderConfig(reuse_host_memory=False),
            "ember_verify": LoaderConfig(verify_checksums=True),
            "ember_buffered": LoaderConfig(io_mode="buffered"),
            "ember_4t": LoaderConfig(threads=4),
            "ember_8t": LoaderConfig(threads=8),
            "ember_16t": LoaderConfig(threads=16),
            "ember_reg": LoaderConfig(register_cached=True),
            "ember_dram": LoaderConfig(),
            "ember_dram_reg": LoaderConfig(register_cached=True),
            "ember_pinned": LoaderConfig(),
            "ember_dram_pinned": LoaderConfig(),
        }[name]
        path = art["ember_dram"] if reads_dram(name) else art["ember"]
        if name.endswith("_pinned"):  # registered once, before the timed loads (not timed)
            from ember.store.cuda_loader import pin_checkpoint

            t0 = time.perf_counter()
            pin_checkpoint(path)
            SETUP["pin_s"] = time.perf_counter() - t0
        return lambda: load(path, device=device, config=cfg)
    raise SystemExit(f"unknown loader {name}")


_RAW_BUFFERS: dict[tuple[int, int, bool], list[mmap.mmap]] = {}
SETUP: dict[str, float] = {}  # untimed set-up a loader did in this child (pinning), reported


def _raw_read(
    files: list[str], direct: bool, threads: int, chunk: int = CHUNK, huge: bool = False
) -> int:
    """Read every byte of `files` into reused buffers (one per thread, page-aligned as O_DIRECT
    needs, 2 MiB pages if `huge`, allocated and touched once per process so no page fault is
    timed), `threads` reads in flight: each thread takes the next chunk from a shared queue
    (all files' chunks in order) as soon as its read returns. Returns the bytes read."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ember.store.hostmem import map_anonymous

    bufs = _RAW_BUFFERS.get((threads, chunk, huge))
    if bufs is None:
        bufs = [map_anonymous(chunk, huge) for _ in range(threads)]
        _RAW_BUFFERS[(threads, chunk, huge)] = bufs
        for b in bufs:
            b.write(b"\0" * len(b))
    fds = [os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for f in files]
    try:
        work = iter([(fd, off) for fd in fds for off in range(0, os.fstat(fd).st_size, chunk)])
        lock = threading.Lock()

        def reader(i: int) -> int:
            view, total = memoryview(bufs[i]), 0
            while True:
                with lock:
                    job = next(work, None)
                if job is None:
                    view.release()
                    return total
                total += os.preadv(job[0], [view], job[1])

        if threads == 1:
            return reader(0)
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(reader, range(threads)))
    finally:
        for fd in fds:
            os.close(fd)


def child(name: str, mode: str, runs: int, art: dict[str, Any], device: str) -> dict[str, Any]:
    from ember.store.pagecache import evict, resident_fraction

    fn = make_loader(name, art, device)
    files = files_of(name, art)
    if mode == "warm":
        for f in files:
            _raw_read([f], direct=False, threads=1)
    # One excluded warm-up run in both modes: imports, thread pools and (for ember's pool) the
    # process's first allocation are paid here; cold runs evict the files again below.
    fn()
    gc.collect()
    times, cpu, residual = [], [], 0.0
    for _ in range(runs):
        if mode == "cold":
            residual = max([residual] + [evict(f) for f in files])
        else:
            # Again after the warm-up: under memory pressure its allocation can push the files
            # out of the page cache, and the run would not be warm.
            _raw_read(files, direct=False, threads=1)
            residual = max([residual] + [1.0 - resident_fraction(f) for f in files])
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
        del result
        gc.collect()
    key = "max_resident_after_evict" if mode == "cold" else "max_not_resident"
    row = {"loader": name, "mode": mode, "seconds": times, "cpu_seconds": cpu, key: residual}
    return row | ({"setup_seconds": SETUP} if SETUP else {})


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- ceilings measured in the parent ------------------------------------------------------------


def memory_rows(nbytes: int, runs: int) -> list[dict[str, Any]]:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.ones(nbytes, dtype=torch.uint8)
    rows = []
    for name, fn in (
        ("memcpy_mapped", lambda: dst.copy_(src)),
        ("memcpy_fresh_pages", lambda: torch.empty(nbytes, dtype=torch.uint8).copy_(src)),
    ):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append({"loader": name, "mode": "memory", "seconds": times})
    return rows


def cuda_rows(nbytes: int, runs: int) -> list[dict[str, Any]]:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return [{"loader": "pinned_h2d", "mode": "memory", "seconds": times[1:]}]


# --- report -----------------------------------------------------------------------------------


def summarize(row: dict[str, Any], nbytes: int) -> dict[str, Any]:
    s = row["seconds"]
    row["best_gbps"] = nbytes / min(s) / 1e9
    row["median_gbps"] = nbytes / statistics.median(s) / 1e9
    row["ends_in"] = ENDS_IN.get(row["loader"], "own memory")
    if row.get("cpu_seconds"):
        row["gb_per_cpu_second"] = nbytes / max(statistics.median(row["cpu_seconds"]), 1e-9) / 1e9
    return row


def best(
    rows: list[dict[str, Any]], names: tuple[str, ...] | list[str], mode: str
) -> tuple[str, float]:
    got = [
        (r["loader"], r["best_gbps"]) for r in rows if r["loader"] in names and r["mode"] == mode
    ]
    return max(got, key=lambda x: x[1]) if got else ("none", float("nan"))


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, for ember's default load (pooled memory) and into fresh memory; a
    target whose baseline row was not run (a --loaders subset) is left out."""
    out = []
    h2d = [r["best_gbps"] for r in rows if r["loader"] == "pinned_h2d"]
    if h2d:  # on CUDA: every ember variant against the host-to-device ceiling
        for r in rows:
            if r["loader"].startswith("ember") and r["mode"] == "warm":
                out.append(
                    _target(
                        r["loader"], "warm to GPU >= 80% of pinned host-to-device",
                        r["best_gbps"], 0.8 * h2d[0],
                    )
                )  # fmt: skip
    for variant in ("ember", "ember_fresh"):
        if not any(r["loader"] == variant for r in rows):
            continue
        for mode in ("cold", "warm"):
            mine = best(rows, [variant], mode)[1]
            peer_name, peer = best(rows, OWN_MEMORY_PEERS, mode)
            st = best(rows, ["safetensors_clone"], mode)[1]
            if mode == "cold":
                raw_name, raw = best(rows, RAW, "cold")
                out.append(
                    _target(variant, f"cold >= 95% of best raw read ({raw_name})", mine, 0.95 * raw)
                )
                out.append(
                    _target(variant, f"cold >= best own-memory peer ({peer_name})", mine, peer)
                )
            else:
                out.append(
                    _target(
                        variant, f"warm >= 2x best own-memory peer ({peer_name})", mine, 2 * peer
                    )
                )
            out.append(_target(variant, f"{mode} >= 3x safetensors load_file+clone", mine, 3 * st))
    return [t for t in out if not math.isnan(t["needed_gbps"])]


def _target(variant: str, what: str, value: float, goal: float) -> dict[str, Any]:
    return {
        "variant": variant,
        "target": what,
        "ember_gbps": value,
        "needed_gbps": goal,
        "met": bool(value >= goal),
    }


def print_table(rows: list[dict[str, Any]], tgts: list[dict[str, Any]]) -> None:
    head = f"{'loader':<20}{'mode':<8}{'ends in':<15}{'best GB/s':>10}{'median':>8}{'GB/cpu-s':>10}"
    print(f"\n{head}  runs (s)")
    for r in rows:
        secs = " ".join(f"{x:.2f}" for x in r["seconds"])
        cpu = r.get("gb_per_cpu_second")
        print(
            f"{r['loader']:<20}{r['mode']:<8}{r['ends_in']:<15}{r['best_gbps']:>10.2f}"
            f"{r['median_gbps']:>8.2f}{'' if cpu is None else f'{cpu:.2f}':>10}  {secs}"
        )
    for r in rows:
        if r.get("setup_seconds"):
            print(f"{r['loader']}: untimed set-up before its loads: {r['setup_seconds']}")
    print()
    for t in tgts:
        mark = "MET " if t["met"] else "MISS"
        print(
            f"[{mark}] {t['variant']:<16}{t['target']}: {t['ember_gbps']:.2f} GB/s, "
            f"needs {t['needed_gbps']:.2f}"
        )


def runnable(name: str, device: str) -> bool:
    module = {
        "tensorizer": "tensorizer",
        "fastsafetensors": "fastsafetensors",
        "runai": "runai_model_streamer",
    }
    if name in module and not _has(module[name]):
        print(f"skip {name}: not installed (pip install -e '.[bench]')", flush=True)
        return False
    host_only = ("safetensors_touched", "torch_mmap_touched")  # tensors that map a host file
    return not (device.startswith("cuda") and name in host_only)


def run_child(
    name: str, mode: str, runs: int, art: dict[str, Any], device: str
) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--runs", str(runs), "--device", device,
           "--child", name, mode, json.dumps(art)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(f"{name} {mode} failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1b", help="factory size of the llama model (default 1b)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="125m model, 2 runs")
    p.add_argument(
        "--loaders", default=None, help="comma-separated subset (default: every row for the device)"
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda to load to cuda:0")
    p.add_argument(
        "--no-interleave", action="store_true", help="all runs of a loader in one process, in a row"
    )
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/load.json)")
    p.add_argument(
        "--child", nargs=3, metavar=("LOADER", "MODE", "ARTIFACTS"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.child:
        art = json.loads(args.child[2])
        print(json.dumps(child(args.child[0], args.child[1], args.runs, art, args.device)))
        return 0
    if args.quick:
        args.size, args.runs = "125m", 2
    cuda = args.device.startswith("cuda")
    args.loaders = args.loaders or ",".join(CUDA_LOADERS if cuda else LOADERS)
    args.out = args.out or str(
        ROOT / "benchmarks" / "results" / ("load-cuda.json" if cuda else "load.json")
    )
    art = prepare(args.size, args.loaders.split(","))
    if any(reads_dram(n) for n in args.loaders.split(",")):
        art["ember_dram"] = dram_copy(art)
    facts = machine_facts(art["ember"])
    nbytes = art["payload_bytes"]
    print(f"model llama-{args.size}: {nbytes / 1e9:.2f} GB payload; device {args.device}; "
          f"load average {facts['load_average_at_start']:.1f}", flush=True)  # fmt: skip
    rows = [summarize(r, nbytes) for r in memory_rows(nbytes, args.runs)]
    if args.device.startswith("cuda"):
        rows += [summarize(r, nbytes) for r in cuda_rows(nbytes, args.runs)]
    names = [n for n in args.loaders.split(",") if runnable(n, args.device)]
    if not art.get("ember_dram") and any(reads_dram(n) for n in names):
        print(f"skip ember_dram*: no room for a copy under {DRAM_DIR.parent}", flush=True)
        names = [n for n in names if not reads_dram(n)]
    # Interleaved: round r runs every loader once, so a burst of load from other processes on
    # a shared machine hits all loaders alike instead of whichever ran at that moment.
    rounds, per_child = (1, args.runs) if args.no_interleave else (args.runs, 1)
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for _ in range(rounds):
        for name in names:
            for mode in ("cold", "warm"):
                if mode == "cold" and name in NO_COLD:
                    continue
                got = run_child(name, mode, per_child, art, args.device)
                if got is None:
                    continue
                row = merged.setdefault((name, mode), {**got, "seconds": [], "cpu_seconds": []})
                row["seconds"] += got["seconds"]
                row["cpu_seconds"] += got["cpu_seconds"]
                for k in ("max_resident_after_evict", "max_not_resident"):
                    if k in got:
                        row[k] = max(row[k], got[k])
                print(
                    f"{name:<22}{mode:<6}{nbytes / min(got['seconds']) / 1e9:7.2f} GB/s", flush=True
                )
    shutil.rmtree(DRAM_DIR, ignore_errors=True)
    rows += [summarize(r, nbytes) for r in merged.values()]
    tgts = targets(rows)
    print_table(rows, tgts)
    cold = best(rows, ["ember"], "cold")[1]
    raw_name, raw = best(rows, RAW, "cold")
    facts["load_average_at_end"] = os.getloadavg()[0]
    result = {
        "benchmark": "load",
        "metric": f"ember cold load GB/s (defaults), llama-{args.size} bf16 to {args.device}",
        "value": cold,
        "unit": "GB/s",
        "baseline": raw,
        "baseline_name": f"best raw read of the same bytes, cold: {raw_name} "
        f"(O_DIRECT, threads, bytes per read, 2 MiB pages: {RAW_SETTINGS.get(raw_name)})",
        "ratio": cold / raw if raw else None,
        "payload_bytes": nbytes,
        "runs": args.runs,
        "rows": rows,
        "targets": tgts,
        "machine": facts,
        "git_sha": git_sha(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
