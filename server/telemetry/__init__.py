"""What the orchestrator reports about its own work: per-stage timings, Prometheus metrics, logs."""
