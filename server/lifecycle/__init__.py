"""Model roll-outs: which versions Triton loads, where traffic goes, validation, canaries and rollbacks."""
