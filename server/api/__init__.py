"""The front-ends: native HTTP, OpenAI-compatible HTTP and gRPC handlers, and the plumbing they share."""
