"""Who may call the orchestrator and what they may touch: API keys, JWTs, scopes, tenants and rate limits."""
