"""A streamed request's pause when its instance dies, against sending it again.

`ember serve` (private Ray on 127.0.0.1) with two instances of the 125m factory model (bf16
weights, run in `--dtype`; min = max = 2). For each prompt length (`--contexts`, token ids),
one greedy completion is streamed with `logprobs: 0`, so every chunk names its tokens. Once
`--before` tokens have arrived, the process of the instance serving it (the journal names the
instance, `/admin/status` its pid) gets SIGKILL: the router resumes the request on the other
instance from what the client was sent. Recorded per run: the gap the client saw (the last
chunk before the kill to the first after it), the kill to that chunk, the median gap between
chunks before the kill, and whether the whole text equals an undisturbed run's (and where it
first differs).

Baseline, in the same run and on the same server: what a client without resumption does on
the error, send the request again. The undisturbed run of the same request measures it: the
time from sending it until it has the same `--before` tokens again (its text is the
reference). A retry would also lose the time to notice the error, which the resumed run's
"kill to next token" includes and this does not.

The live move, in the same run (`--notice`, on by default): the same request again, and once
`--before` tokens have arrived a preemption notice for the node (`POST /admin/nodes/{node}/
notice`). The router moves the request to another instance in rounds while it streams and
switches when the target is a few tokens behind; the server's log names the token after which
it switched, and the client's gap there is the move's pause (also recorded: the longest gap
from the notice to the end). `ember serve` here is one machine, so the notice drains both
instances and the replacements start on the same machine (there is no other): the source's
chunks slow down while they load, which is the cost of the notice, not of the move.

    python benchmarks/bench_resume.py [--dtype bf16|fp32] [--contexts 16 512 1536] [--before 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from machine import stamp
from serve_process import free_port, instances, metric_lines, stop, wait_health, wait_ready

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "ember" / "bench-models" / "llama-125m"


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from ember.store.factory import make_model

        print(f"making the 125m factory model in {path} (once)", flush=True)
        make_model(path, "llama", "125m", "bf16")
    return path


def serving_pid(base: str, request_id: str) -> int:
    """The process of the instance a request runs on (the journal names the instance, the
    status its process)."""
    entry = httpx.get(f"{base}/admin/requests/{request_id}", timeout=10).json()
    [pid] = [i["pid"] for i in instances(base) if i["instance_id"] == entry["instance_id"]]
    return int(pid)


def stream(
    base: str,
    prompt: list[int],
    max_tokens: int,
    on_tokens: Any = None,
) -> tuple[float, list[tuple[float, int]], str]:
    """Stream one greedy completion: (send time, [(arrival, tokens so far)] per chunk, text).
    `on_tokens(request_id, count)` runs after each chunk (the kill happens there)."""
    body = {
        "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "stream": True, "logprobs": 0, "ignore_eos": True,
    }  # fmt: skip
    chunks: list[tuple[float, int]] = []
    text = ""
    count = 0
    t0 = time.monotonic()
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream failed: {data['error']}")
            for choice in data.get("choices", []):
                text += choice["text"]
                count += len((choice.get("logprobs") or {}).get("tokens") or [])
            chunks.append((time.monotonic(), count))
            if on_tokens is not None:
                on_tokens(data["id"], count)
    return t0, chunks, text


def one_pair(base: str, prompt: list[int], before: int, max_tokens: int) -> dict[str, Any]:
    # Undisturbed first: the reference text, and the time a retry needs to get back here.
    t0, chunks, ref_text = stream(base, prompt, max_tokens)
    restart_s = next(t for t, n in chunks if n >= before) - t0
    ttft_s = chunks[0][0] - t0

    killed: dict[str, Any] = {}

    def maybe_kill(request_id: str, count: int) -> None:
        if killed or count < before:
            return
        pid = serving_pid(base, request_id)
        killed["at_tokens"] = count
        killed["t"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    t0, chunks, text = stream(base, prompt, max_tokens, maybe_kill)
    t_kill = killed["t"]
    times = [t for t, _ in chunks]
    before_kill = [t for t in times if t <= t_kill]
    gaps = [b - a for a, b in zip(before_kill, before_kill[1:], strict=False)]
    # Chunks the instance sent before it died still arrive just after the kill; the pause is the
    # longest gap from the last chunk before the kill on, and it ends at the first resumed one.
    tail = times[len(before_kill) - 1 :]
    pauses = [b - a for a, b in zip(tail, tail[1:], strict=False)]
    worst = max(range(len(pauses)), key=pauses.__getitem__)
    return {
        "tokens_before_kill": killed["at_tokens"],
        "context_tokens": len(prompt) + killed["at_tokens"],
        "client_gap_s": pauses[worst],
        "kill_to_next_token_s": tail[worst + 1] - t_kill,
        "median_chunk_gap_before_s": statistics.median(gaps) if gaps else None,
        "restart_to_same_point_s": restart_s,
        "restart_ttft_s": ttft_s,
        "identical_text": text == ref_text,
        "chars": len(text),
        # where the text first differs from the undisturbed run's (None: nowhere)
        "first_difference_char": next(
            (i for i, (a, b) in enumerate(zip(text, ref_text, strict=False)) if a != b),
            None if len(text) == len(ref_text) else min(len(text), len(ref_text)),
        ),
    }


def one_move(
    base: str, prompt: list[int], before: int, max_tokens: int, log_path: Path, ref_text: str
) -> dict[str, Any]:
    """The same request moved live on a preemption notice for its node; see the docstring."""
    noticed: dict[str, Any] = {}

    def maybe_notice(request_id: str, count: int) -> None:
        if noticed or count < before:
            return
        node = httpx.get(f"{base}/admin/status", timeout=10).json()["nodes"][0]["node_id"]
        noticed["t"] = time.monotonic()
        noticed["at_tokens"] = count
        noticed["id"] = request_id
        r = httpx.post(f"{base}/admin/nodes/{node}/notice", json={"deadline_s": 120}, timeout=10)
        r.raise_for_status()

    _, chunks, text = stream(base, prompt, max_tokens, maybe_notice)
    moves = re.findall(
        rf"request {re.escape(noticed['id'])} moved to \S+ after (\d+) tokens \((\d+) sent",
        log_path.read_text(errors="replace"),
    )
    if not moves:
        raise RuntimeError(f"request {noticed['id']} was not moved (see {log_path})")
    at, last_round = int(moves[-1][0]), int(moves[-1][1])
    # The client has `at` tokens when the source stops: the pause is the gap after that chunk.
    i = next(k for k, (_, n) in enumerate(chunks) if n >= at)
    times = [t for t, _ in chunks]
    after = [t for t in times if t >= noticed["t"]]
    before_notice = [t for t in times if t < noticed["t"]]
    gaps = [b - a for a, b in zip(before_notice, before_notice[1:], strict=False)]
    return {
        "tokens_before_notice": noticed["at_tokens"],
        "switch_after_tokens": at,
        "last_round_tokens": last_round,
        "notice_to_switch_s": times[i] - noticed["t"],
        "switch_gap_s": times[i + 1] - times[i] if i + 1 < len(times) else None,
        "longest_gap_after_notice_s": max(
            (b - a for a, b in zip(after, after[1:], strict=False)), default=None
        ),
        "median_chunk_gap_before_s": statistics.median(gaps) if gaps else None,
        "identical_text": text == ref_text,
    }


def move_medians(moves: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over `one_move` rows: the switch's gap, the longest gap after the notice, the
    notice to the switch; and whether every text was the undisturbed one."""
    gaps = [m["switch_gap_s"] for m in moves if m["switch_gap_s"] is not None]
    return {
        "switch_gap_s_median": statistics.median(gaps) if gaps else None,
        "longest_gap_after_notice_s_median": statistics.median(
            m["longest_gap_after_notice_s"] for m in moves
        ),
        "notice_to_switch_s_median": statistics.median(m["notice_to_switch_s"] for m in moves),
        "all_identical": all(m["identical_text"] for m in moves),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 512, 1536])
    p.add_argument("--before", type=int, default=64, help="tokens streamed before the kill")
    p.add_argument("--after", type=int, default=64, help="tokens to generate after the kill")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--dtype", default="bf16", help="the deployment's dtype (fp32: exact)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/resume-DTYPE.json")
    p.add_argument(
        "--notice-after", type=int, default=1500,
        help="tokens to generate after the notice (the replacement's cold start runs meanwhile)",
    )  # fmt: skip
    p.add_argument("--no-notice", dest="notice", action="store_false", help="skip the live move")
    args = p.parse_args()
    model = ensure_model(args.model)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-resume-") as tmp:
        work = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "EMBER_DRAM_DIR": str(work / "shm"), "EMBER_SSD_DIR": str(work / "ssd"),
        }  # fmt: skip
        log_path = work / "serve.log"
        log = open(log_path, "ab")  # noqa: SIM115  # closed below
        server = subprocess.Popen(
            [sys.executable, "-m", "ember", "serve", "--port", str(port), "--num-cpus", "4",
             "--state-dir", str(work / "state"), "--cache-dir", str(work / "cache")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work,
        )  # fmt: skip
        try:
            wait_health(base, server, 180, log_path)
            spec = {
                "name": "m", "source": str(model), "min_instances": 2, "max_instances": 2,
                "dtype": args.dtype,
            }  # fmt: skip
            httpx.post(base + "/admin/deployments", json=spec, timeout=60).raise_for_status()
            wait_ready(base, 2)
            rng = random.Random(0)
            for context in args.contexts:
                prompt = [rng.randrange(100, 30000) for _ in range(context)]
                for run in range(args.runs):
                    row = one_pair(base, prompt, args.before, args.before + args.after)
                    row |= {"prompt_tokens": context, "run": run}
                    wait_ready(base, 2)  # the lost instance replaced
                    if args.notice:
                        _, _, ref = stream(base, prompt, args.before + args.notice_after)
                        move = one_move(
                            base, prompt, args.before, args.before + args.notice_after,
                            log_path, ref,
                        )  # fmt: skip
                        row["move"] = move
                        print(
                            f"prompt {context:5d} run {run}: moved after "
                            f"{move['switch_after_tokens']} tokens ({move['last_round_tokens']} "
                            f"in the last round), switch gap {move['switch_gap_s'] or 0:.3f} s, "
                            f"longest gap after the notice "
                            f"{move['longest_gap_after_notice_s'] or 0:.3f} s; identical "
                            f"{move['identical_text']}",
                            flush=True,
                        )
                    rows.append(row)
                    print(
                        f"prompt {context:5d} run {run}: client gap {row['client_gap_s']:.3f} s "
                        f"(kill->next {row['kill_to_next_token_s']:.3f} s, chunk gap "
                        f"{row['median_chunk_gap_before_s'] or 0:.3f} s); send again to the "
                        f"same point {row['restart_to_same_point_s']:.3f} s; identical "
                        f"{row['identical_text']}",
                        flush=True,
                    )
                    wait_ready(base, 2)  # the lost instance replaced before the next run
            resumed = metric_lines(base, "ember_requests_resumed", "ember_requests_migrated")
        finally:
            stop(server)
            log.close()
            shutil.rmtree(work / "shm", ignore_errors=True)
    summary = []
    for context in args.contexts:
        mine = [r for r in rows if r["prompt_tokens"] == context]
        summary.append(
            {
                "prompt_tokens": context,
                "context_tokens_median": statistics.median(r["context_tokens"] for r in mine),
                "client_gap_s_median": statistics.median(r["client_gap_s"] for r in mine),
                "kill_to_next_token_s_median": statistics.median(
                    r["kill_to_next_token_s"] for r in mine
                ),
                "restart_to_same_point_s_median": statistics.median(
                    r["restart_to_same_point_s"] for r in mine
                ),
                "all_identical": all(r["identical_text"] for r in mine),
            }
        )
        moved = [r["move"] for r in mine if "move" in r]
        if moved:
            summary[-1] |= {f"move_{k}": v for k, v in move_medians(moved).items()}
    result = {
        **stamp("resume"),
        "settings": {
            "model": f"llama 125m factory model (bf16 weights), run in {args.dtype}",
            "instances": 2,
            "greedy": True,
            "before": args.before,
            "after": args.after,
            "runs": args.runs,
            "kill": "SIGKILL to the serving instance's process once `before` tokens arrived",
            "baseline": "the same request undisturbed: send to `before` tokens (a retry's cost)",
            "notice": "a preemption notice for the node once `before` tokens arrived (live move)"
            if args.notice
            else None,
        },  # fmt: skip
        "runs": rows,
        "summary": summary,
        "resumed_metric": resumed,
    }
    out = args.out or str(ROOT / "benchmarks" / "results" / f"resume-{args.dtype}.json")
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
