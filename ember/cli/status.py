"""`ember status [--json]`: deployments, their instances (node, state) and the cluster's nodes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ember.cli.admin_client import AdminClient, add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the state as JSON (scripts)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    state = AdminClient.from_args(args).status()
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(render(state))
    return 0


def render(state: dict[str, Any]) -> str:
    """The status as a table a person can read."""
    lines: list[str] = []
    deployments = state.get("deployments", [])
    if not deployments:
        lines.append("no deployments")
    for d in deployments:
        spec = d.get("spec", {})
        insts = d.get("instances", [])
        ready = sum(1 for i in insts if i.get("state") == "ready")
        lines.append(
            f"{d['name']}  source={spec.get('source')}  ready={ready} desired={d.get('desired')}"
            f"  min={spec.get('min_instances')} max={spec.get('max_instances')}"
            f"  keep_alive_s={spec.get('keep_alive_s')}  queued={d.get('queued', 0)}"
            f"  in_flight={d.get('in_flight', 0)}"
        )
        if d.get("last_error"):
            lines.append(f"  last start failed: {d['last_error']}")
        if d.get("cached_on"):
            lines.append("  checkpoint cached on: " + ", ".join(n[:12] for n in d["cached_on"]))
        for i in insts:
            load = i.get("load_s")
            load_text = f"{load:.2f}" if isinstance(load, (int, float)) else "-"
            est = i.get("estimated_load_s")
            if isinstance(est, (int, float)):  # placement's estimate, to compare
                load_text += f" (est {est:.2f})"
            err = f"  error={i['error']}" if i.get("error") else ""
            tier = f" from={i['tier']}" if i.get("tier") else ""
            if i.get("revision", 0) != d.get("revision", 0):  # a rolling update's old one
                tier += f" revision={i.get('revision', 0)} (old)"
            pid = f" pid={i['pid']}" if i.get("pid") else ""
            lines.append(
                f"  {i['instance_id']:<24} {i['state']:<9} node={(i.get('node_id') or '-')[:12]:<12}"
                f" in_flight={i.get('in_flight', 0)} load_s={load_text}{tier}{pid}{err}"
            )
            engine = i.get("engine") or {}
            moved = [f"{k}={engine[k]}" for k in ("kv_pulls", "kv_pull_failures") if engine.get(k)]
            if engine.get("broken"):
                moved.append(f"engine failed: {engine['broken']}")
            if moved:
                lines.append("    " + " ".join(moved))
    nodes = state.get("nodes") or []
    if nodes:
        lines.append("nodes:")
        for n in nodes:
            labels = ",".join(f"{k}={v}" for k, v in sorted((n.get("labels") or {}).items()))
            lines.append(
                f"  {n['node_id'][:12]:<12} {n.get('address', ''):<15} "
                f"{'alive' if n.get('alive') else 'dead':<5} "
                f"cpus={n.get('cpus_available', 0):g}/{n.get('cpus_total', 0):g} "
                f"gpus={n.get('gpus_available', 0):g}/{n.get('gpus_total', 0):g}"
                + (f" labels={labels}" if labels else "")
                + (f" pool={n['pool_idle']}" if n.get("pool_idle") else "")
                + (
                    f" NOTICE: goes in {n['notice_s']:.0f} s"
                    if n.get("notice_s") is not None
                    else ""
                )
                + _rates_text(n.get("fetch_bytes_per_s") or {})
            )
    checkpoints = state.get("checkpoints") or {}
    if checkpoints:
        lines.append("checkpoints (node store tiers):")
        for node_id, rows in sorted(checkpoints.items()):
            for r in rows:
                fetched = r.get("fetched")
                how = f"pins={r['pins']}" if fetched is None else f"fetching {fetched:.0%}"
                if r.get("retired"):  # an older version, held until its instances stop
                    how = f"retired (old version, pins={r['pins']})"
                lines.append(
                    f"  {node_id[:12]:<12} {r['tier']:<5} {r['nbytes'] / 1e9:>7.2f} GB"
                    f" {how}  {r['key']}"
                )
    return "\n".join(lines)


def _rates_text(rates: dict[str, float]) -> str:
    """The node store's measured fetch rates, e.g. " fetch: remote 0.14 GB/s, ssd 2.31 GB/s"."""
    parts = [f"{k} {rates[k] / 1e9:.2f} GB/s" for k in ("remote", "peer", "ssd") if rates.get(k)]
    return " fetch: " + ", ".join(parts) if parts else ""
