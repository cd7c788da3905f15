"""The cache's Prometheus metrics, in the default registry (served on ``/metrics``), summed over the process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

REQUESTS = Counter(
    "tritonrag_cache_requests",
    "Cache lookups by level (l1, l2), tier and outcome (hit, miss; error: Redis failed or was skipped, "
    "lookups and stores alike, and the request went on without it)",
    ["level", "tier", "outcome"],
)
ENTRIES = Gauge("tritonrag_cache_entries", "Entries in the in-process cache", ["level", "tier"])
BYTES = Gauge("tritonrag_cache_bytes", "Bytes (keys and values) in the in-process cache", ["level", "tier"])
COALESCED = Counter(
    "tritonrag_cache_coalesced", "Misses that waited for an identical computation in flight (single flight)", ["tier"]
)
