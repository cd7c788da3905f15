"""Talking to Triton: the endpoint pool (routing, health probes, circuit breakers, retries)."""
