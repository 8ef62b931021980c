"""Per-step row-storage metrics of the table engines (host tables: cache and transfer figures).

`OffloadMeter.step_scalars()` turns the engines' cumulative counters (engine.offload_stats) into
the step's TensorBoard scalars:
- stem/cache_token_hit_rate: requested rows already resident, weighted by their tokens;
- stem/cache_row_hit_rate: the same per unique row (each owner counts a micro-batch's rows once);
- stem/h2d_bytes, stem/d2h_bytes: host-to-device (cache misses, streamed update chunks, gradient
  rounds) and device-to-host (row gradients leaving the device, updated state written back)
  bytes this step;
- stem/host_gather_s: worker time selecting rows on the host;
- stem/exposed_wait_s: time forwards waited for their rows (host gathers and the row all-to-all);
- stem/device_peak_bytes: host tables: the peak so far of the device bytes the engines hold (row
  cache + exchange buffers in flight + step-end chunk, stem/device_budget.py; the sum of each
  engine's peak), and stem/device_bound_bytes, the dry run's bound for this rank's stage: the
  first stays within the second (tests/test_stem_offload_training.py).
Hit rates are None with device tables (there is no cache).
"""

from __future__ import annotations

KEYS = ("hit_weight", "req_weight", "hit_rows", "req_rows", "h2d_bytes", "d2h_bytes", "gather_seconds",
        "exposed_wait_seconds")


class OffloadMeter:
    def __init__(self, engines, device_bound_bytes: int | None = None):
        self.engines = engines
        self.device_bound_bytes = device_bound_bytes
        self.prev = self._totals()

    def _totals(self) -> dict:
        out = dict.fromkeys(KEYS, 0.0)
        for e in self.engines:
            st = e.offload_stats()
            for k in KEYS:
                out[k] += st.get(k, 0.0)
        return out

    def step_scalars(self) -> dict:
        now = self._totals()
        d = {k: now[k] - self.prev[k] for k in KEYS}
        self.prev = now
        peak = [e.offload_stats().get("device_peak_bytes") for e in self.engines]
        return {
            "stem/device_peak_bytes": sum(peak) if peak and None not in peak else None,
            "stem/device_bound_bytes": self.device_bound_bytes,
            "stem/cache_token_hit_rate": d["hit_weight"] / d["req_weight"] if d["req_weight"] else None,
            "stem/cache_row_hit_rate": d["hit_rows"] / d["req_rows"] if d["req_rows"] else None,
            "stem/h2d_bytes": d["h2d_bytes"],
            "stem/d2h_bytes": d["d2h_bytes"],
            "stem/host_gather_s": d["gather_seconds"],
            "stem/exposed_wait_s": d["exposed_wait_seconds"],
        }

    @staticmethod
    def console(scalars: dict) -> str:
        """' cache 0.91/0.78 h2d 1.2MB d2h 3.4MB wait 5ms' (host tables), else ' wait 5ms'."""
        wait = f" wait {1000 * scalars['stem/exposed_wait_s']:.0f}ms"
        if scalars["stem/cache_token_hit_rate"] is None:
            return wait
        return (f" cache {scalars['stem/cache_token_hit_rate']:.2f}/{scalars['stem/cache_row_hit_rate']:.2f}"
                f" h2d {scalars['stem/h2d_bytes'] / 1e6:.1f}MB d2h {scalars['stem/d2h_bytes'] / 1e6:.1f}MB"
                f" gather {1000 * scalars['stem/host_gather_s']:.0f}ms{wait}"
                + (f" dev {scalars['stem/device_peak_bytes'] / 1e6:.1f}/{scalars['stem/device_bound_bytes'] / 1e6:.1f}MB"
                   if scalars.get("stem/device_peak_bytes") is not None and scalars.get("stem/device_bound_bytes") else ""))
