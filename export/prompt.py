"""The prompt of ``generative_query_likelihood`` rerankers, rendered once with the model's chat template.

The user turn holds the passage and an instruction; the assistant's turn is the query, whose tokens the
model scores. The rendered template ends at the query slot: what the template puts after the answer is
not scored.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from transformers import PreTrainedTokenizerBase

from .errors import ExportError
from .runtime.encoding import PromptTemplate

INSTRUCTION = "Passage: {passage}\n\nWrite a search query for this passage."


def render_prompt(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The chat-rendered prompt as ``tritonrag.json`` stores it: template text with a passage then a query slot,
    ending at the query slot."""
    if not tokenizer.chat_template:
        raise ExportError(
            "a query-likelihood reranker needs an instruction-tuned model whose tokenizer has a chat template"
        )
    query_slot, passage_slot = PromptTemplate.query_slot, PromptTemplate.passage_slot
    messages = [
        {"role": "user", "content": INSTRUCTION.format(passage=passage_slot)},
        {"role": "assistant", "content": query_slot},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(rendered, str):
        raise ExportError(f"the chat template rendered a {type(rendered).__name__}, not text")
    counts = (rendered.count(passage_slot), rendered.count(query_slot))
    if counts != (1, 1) or rendered.find(passage_slot) > rendered.find(query_slot):
        raise ExportError(f"the chat template must keep the passage then the query once each; it rendered {rendered!r}")
    return asdict(PromptTemplate(template=rendered[: rendered.find(query_slot) + len(query_slot)]))
