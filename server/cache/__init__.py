"""The two-level cache: an in-process L1 and an optional Redis L2, in front of embeddings, searches and answers.

Every key holds every parameter that changes a result, the versions of the models involved and the
collection's write revision; a write bumps the revision, so no stale entry is ever reachable and
nothing needs deleting. See docs/SERVER.md, "Cache".
"""
