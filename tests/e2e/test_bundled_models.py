"""The real bundled models (MiniLM embedder, SmolLM2 reranker) served by a real Triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests import reference
from tests.reference import QueryLikelihoodReference
from tests.serving import embed, rerank

SENTENCES = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The mitochondria is the powerhouse of the cell, producing most of its chemical energy.",
    "Bananas are yellow.",
    "In 1969, Apollo 11 landed the first humans on the Moon, and Neil Armstrong stepped onto the lunar "
    "surface while Buzz Aldrin followed shortly after; Michael Collins stayed in lunar orbit aboard the "
    "command module Columbia.",
]


def test_embedder_matches_pytorch_in_one_mixed_length_batch(
    bundled_triton: grpcclient.InferenceServerClient, minilm_dir: Path
) -> None:
    served = embed(bundled_triton, SENTENCES)
    expected = reference.embeddings(minilm_dir, SENTENCES, max_length=256)
    assert served.shape == (len(SENTENCES), 384)
    cosines = (served * expected).sum(axis=1)
    assert cosines.min() >= 0.999, cosines
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_embedder_puts_the_paris_sentence_nearest(bundled_triton: grpcclient.InferenceServerClient) -> None:
    query, paris, *others = embed(bundled_triton, SENTENCES[:4])
    paris_similarity = float(query @ paris)
    best_other = max(float(query @ o) for o in others)
    assert paris_similarity > 0.6
    assert paris_similarity - best_other > 0.3, (paris_similarity, best_other)


RELEVANCE = [
    (
        "What is the capital of France?",
        "Paris is the capital and most populous city of France.",
        ["Bananas are a popular fruit rich in potassium.", "The Pacific is the largest ocean on Earth."],
    ),
    (
        "How do vaccines work?",
        "Vaccines train the immune system to recognise a pathogen by exposing it to a harmless piece of it.",
        ["The Eiffel Tower was completed in 1889.", "Python lists are mutable sequences."],
    ),
    (
        "How do I reverse a list in Python?",
        "Call list.reverse() to reverse a Python list in place, or use reversed() for an iterator.",
        ["Mount Everest is the highest mountain above sea level.", "Coffee is brewed from roasted beans."],
    ),
    (
        "Who wrote Pride and Prejudice?",
        "Pride and Prejudice is an 1813 novel by Jane Austen.",
        ["Photosynthesis turns light into chemical energy.", "The stock market fell sharply on Monday."],
    ),
]


def test_reranker_puts_the_relevant_passage_first(bundled_triton: grpcclient.InferenceServerClient) -> None:
    for query, relevant, irrelevant in RELEVANCE:
        scores = rerank(bundled_triton, query, [relevant, *irrelevant])
        assert scores[0] > max(scores[1:]), (query, scores)


def test_reranker_matches_pytorch(
    bundled_triton: grpcclient.InferenceServerClient, bundled_reranker: QueryLikelihoodReference
) -> None:
    pairs = [(q, p) for q, relevant, irrelevant in RELEVANCE for p in (relevant, *irrelevant)]
    served = np.concatenate([rerank(bundled_triton, q, [p]) for q, p in pairs])
    expected = bundled_reranker.scores(pairs)
    assert np.abs(served - expected).max() <= 1e-3 * max(1.0, float(np.abs(expected).max()))
    assert (np.argsort(served) == np.argsort(expected)).all()
