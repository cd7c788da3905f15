"""The orchestrator: front-ends (``api``) over services (collections, search, answers, models) over Triton."""
