"""What the orchestrator reports about its own work: per-stage timings of a request."""
