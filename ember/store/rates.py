"""Measured rates at which checkpoints reach one node's DRAM tier, by where they come from.

ServerlessLLM's loading-time estimate divides a checkpoint's bytes by the bandwidth of the
tier it is read from. Its reference code hard-codes PCIe at 25 GB/s and measures the disk
once with a 100 MB temp file; remote bandwidth it does not estimate at all. Here every fetch
the node store completes is a measurement: the bytes it moved from the source over the
seconds it took, verification and writes included (what a start from that tier waits for).
`"remote"` is the S3 link into this node; `"ssd"` is a read of this node's disk (the SSD tier,
or a local checkpoint directory); `"peer"` is a fetch from another node's copy
(`ember.store.peer`). Fetches smaller than `min_bytes` are not counted: per-request
latency dominates them and would make a link look slower than it is for a real model. Nor is
the background copy into DRAM behind an instance that maps an SSD copy (one thread at the
lowest priority: a measure of nothing a start waits for).

The rates are an exponentially weighted mean (`alpha`, the newest fetch's weight) kept in a
small JSON file next to the SSD tier, so a store restarted on the node knows them at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("remote", "ssd", "peer")
RATES_FILE = "rates.json"


class LinkRates:
    def __init__(self, path: Path | None, *, min_bytes: int = 64 << 20, alpha: float = 0.5):
        self.path = path
        self.min_bytes = min_bytes
        self.alpha = alpha
        self._lock = threading.Lock()
        self._rates: dict[str, float] = {}
        self._samples: dict[str, int] = {}
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
                for kind in KINDS:
                    row = saved.get(kind) or {}
                    rate, n = float(row.get("bytes_per_s", 0)), int(row.get("samples", 0))
                    if math.isfinite(rate) and rate > 0 and n > 0:
                        self._rates[kind], self._samples[kind] = rate, n
            except (OSError, ValueError, TypeError, AttributeError) as e:
                logger.warning("ignoring unreadable %s: %s", path, e)

    def observe(self, kind: str, nbytes: int, seconds: float) -> bool:
        """Count one fetch of `nbytes` from `kind` ("remote", "ssd", "peer"; "local" counts as "ssd")
        that took `seconds`. Returns whether it was counted."""
        kind = "ssd" if kind == "local" else kind
        if kind not in KINDS or nbytes < self.min_bytes or not seconds > 0:
            return False
        rate = nbytes / seconds
        with self._lock:
            old = self._rates.get(kind)
            self._rates[kind] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old
            self._samples[kind] = self._samples.get(kind, 0) + 1
            snapshot = self._snapshot()
        logger.info(
            "link rate kind=%s sample_gbps=%.3f mean_gbps=%.3f", kind, rate / 1e9,
            snapshot[kind]["bytes_per_s"] / 1e9,
        )  # fmt: skip
        self._save(snapshot)
        return True

    def rates(self) -> dict[str, float]:
        """Kind -> bytes per second, for the kinds measured at least once."""
        with self._lock:
            return dict(self._rates)

    def _snapshot(self) -> dict[str, dict[str, float]]:
        return {
            k: {"bytes_per_s": self._rates[k], "samples": self._samples[k]} for k in self._rates
        }

    def _save(self, snapshot: dict[str, dict[str, float]]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(snapshot, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:  # a full or read-only disk: the rates live on in memory
            logger.warning("could not save %s: %s", self.path, e)
            tmp.unlink(missing_ok=True)
