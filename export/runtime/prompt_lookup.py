"""Draft tokens for speculative decoding by prompt lookup: what followed the sequence's last words before.

A grounded answer repeats its passages' words, names and code, and its own: where the last few tokens of a
sequence (prompt and generated) occurred earlier in it, the tokens that followed them then are a likely
continuation now. The engine feeds such a draft after the sequence's last token in one run of the decoder
(``SlotDecoder.verify``) and takes the tokens that the sampler chooses from those logits for as long as they
match the draft, plus the first that does not: one call of the sampler per token, in order, so the output is
the one decoding token by token gives, greedy or sampled with a seed, up to float rounding (the run over the
draft takes the float32 graph, whose logits differ from the one-row graph's by under 1e-4). This is vLLM's
"ngram" speculative decoding and transformers' ``prompt_lookup_num_tokens``. A run over several tokens costs
little more than a step of one while a step is bound by reading the weights, so each accepted token saves most
of a step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# The tail looked up, in tokens. On the RAG prompts of bench/generate.py (16 answers of 128 tokens, drafts of 8),
# 3 alone was fastest: 1.29x token by token, where tails of 3 else 2 gave 1.24x and 3, 2 else 1 1.07x (a shorter
# tail finds more drafts, of which fewer hold); 4 else 3 gave 1.29x as well.
NGRAM = 3


def draft_tokens(sequence: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` tokens that followed the latest earlier occurrence of ``sequence``'s last ``NGRAM``
    tokens; none where those occur nowhere before."""
    tokens = np.asarray(sequence, dtype=np.int64)
    if count <= 0 or len(tokens) <= NGRAM:
        return []
    # Windows that end before the last token: each has a token after it, and the tail itself is not one.
    hits = np.flatnonzero((sliding_window_view(tokens[:-1], NGRAM) == tokens[-NGRAM:]).all(axis=1))
    if not hits.size:
        return []
    start = int(hits[-1]) + NGRAM
    draft: list[int] = tokens[start : start + count].tolist()
    return draft
