"""The contract between the Triton models and the orchestrator: every name that crosses the process boundary.

Tensor names, ``config.pbtxt`` parameter keys, error-message prefixes and the file names of a
version directory are defined here once; the exporter, the Triton runtime (this folder) and the
orchestrator (``tritonrag.server``) import them. This module imports nothing, so that it travels
with the runtime code it belongs to.
"""

from __future__ import annotations

from typing import Final

# The files of a version directory (``model_repository/<model>/<N>/``) and of a model folder.
METADATA_FILE: Final = "tritonrag.json"  # what the exporter says about the version (task, limits, template)
TOKENIZER_FILE: Final = "tokenizer.json"  # the fast tokenizer the model and the orchestrator both use
ONNX_FILE: Final = "model.onnx"
# A generator's graph for decode steps of one row: model.onnx with its weights packed as 4-bit blocks, exactly
# (tritonrag.export.packed_weights); beside model.onnx where ``tritonrag.json`` names it (``one_row_graph``).
ONE_ROW_ONNX_FILE: Final = "model.one_row.onnx"
MODEL_FILE: Final = "model.py"  # the Python-backend model Triton loads
RUNTIME_DIR: Final = "runtime"  # the version's copy of this folder, which model.py imports relatively
CONFIG_FILE: Final = "config.pbtxt"  # beside the version directories
# ``tritonrag.json``'s ``attention`` of a generator whose graph is built on ``GroupQueryAttention`` (its engine
# keeps the KV cache in place); absent for the graph exported from transformers' attention.
GROUP_QUERY_ATTENTION: Final = "group_query"


class EmbedderTensors:
    """``embedder``: ``TEXT`` rows in, L2-normalised float32 ``EMBEDDING`` rows out."""

    TEXT: Final = "TEXT"
    EMBEDDING: Final = "EMBEDDING"


class RerankerTensors:
    """``reranker``: (``QUERY``, ``PASSAGE``) rows in, one float32 ``SCORE`` per row out."""

    QUERY: Final = "QUERY"
    PASSAGE: Final = "PASSAGE"
    SCORE: Final = "SCORE"


class GeneratorTensors:
    """``generator`` (decoupled, streaming).

    Inputs: exactly one of ``PROMPT`` (raw text) and ``MESSAGES`` (JSON ``[{"role", "content"}]``,
    rendered with the model's chat template), and ``PARAMETERS`` (JSON sampling parameters). Outputs
    of each streamed response: ``TEXT`` (the new text), ``FINISH_REASON`` (empty until the last
    response), ``PROMPT_TOKENS`` and ``COMPLETION_TOKENS``.
    """

    PROMPT: Final = "PROMPT"
    MESSAGES: Final = "MESSAGES"
    PARAMETERS: Final = "PARAMETERS"
    TEXT: Final = "TEXT"
    FINISH_REASON: Final = "FINISH_REASON"
    PROMPT_TOKENS: Final = "PROMPT_TOKENS"
    COMPLETION_TOKENS: Final = "COMPLETION_TOKENS"


class Parameters:
    """Keys of the string ``parameters`` of a model's ``config.pbtxt``."""

    TRUNCATE: Final = "truncate"  # text models: cut over-long rows ("true") or reject them
    MAX_BATCH_TOKENS: Final = "max_batch_tokens"  # text models: padded tokens per ONNX Runtime call
    INTRA_OP_THREADS: Final = "intra_op_threads"  # ONNX Runtime threads per instance; 0: every core
    MAX_SEQUENCES: Final = "max_sequences"  # generator: sequences stepped together
    MAX_KV_TOKENS: Final = "max_kv_tokens"  # generator: KV-cache slots the running sequences may hold
    MAX_QUEUE: Final = "max_queue"  # generator: requests waiting for a slot before it refuses
    TRUNCATE_PROMPT: Final = "truncate_prompt"  # generator: drop an over-long prompt's first tokens, or reject it
    PREFIX_CACHE_MB: Final = "prefix_cache_mb"  # generator: MB of recent prompts' KV cache kept for reuse; 0: none
    PREFILL_CHUNK_TOKENS: Final = "prefill_chunk_tokens"  # generator: prompt tokens per step between decodes; 0: all
    # generator: draft tokens (prompt lookup) checked per step of a sequence running alone; 0: no speculation
    SPECULATIVE_TOKENS: Final = "speculative_tokens"
    # text models: the (estimated) tokens the orchestrator puts in one request, so that no request outlives
    # its timeout however long the work it is part of
    MAX_REQUEST_TOKENS: Final = "max_request_tokens"
    # text models: the nice value (1-19) of the thread that runs batches made only of bulk requests, so that the
    # operating system gives a search's embedding the cores first; 0: bulk work runs like any other
    BULK_NICE: Final = "bulk_nice"


class GeneratorMetrics:
    """The generator's gauges and counters on Triton's own metrics endpoint (port 8002), labelled ``model`` and
    ``version``; set after every engine step."""

    QUEUE_DEPTH: Final = "tritonrag_generator_queue_depth"  # requests waiting for a sequence slot
    QUEUE_CAPACITY: Final = "tritonrag_generator_queue_capacity"  # the most that may wait (max_queue); then refused
    RUNNING: Final = "tritonrag_generator_running_sequences"  # sequences in the running batch
    # counters: prompts whose beginning was found in the prefix cache, those whose was not, and the prompt
    # tokens that hits spared the prefill
    PREFIX_HITS: Final = "tritonrag_generator_prefix_cache_hits"
    PREFIX_MISSES: Final = "tritonrag_generator_prefix_cache_misses"
    PREFIX_SAVED_TOKENS: Final = "tritonrag_generator_prefix_cache_saved_tokens"
    # counters: draft tokens that speculative decoding checked (prompt lookup), and those it took
    DRAFT_TOKENS: Final = "tritonrag_generator_draft_tokens"
    ACCEPTED_DRAFT_TOKENS: Final = "tritonrag_generator_accepted_draft_tokens"


class Priority:
    """Request priorities of the batched models (``dynamic_batching { priority_levels: 2 }``): a search's
    embedding and reranking overtake queued ingestion work. 1 is served first."""

    INTERACTIVE: Final = 1
    BULK: Final = 2


# The request parameter (a bool) that marks a request of the text models as bulk (ingestion) work.
BULK_REQUEST_PARAMETER: Final = "tritonrag_bulk"


# Triton's gRPC stream carries a model's error as a message without its status code, so the
# generator starts the message of each error a caller must tell apart with one of these prefixes.
INPUT_ERROR: Final = "invalid input: "  # the request is wrong; do not retry
BUSY_ERROR: Final = "generator busy: "  # the wait queue is full; another endpoint, or later, may take it
