"""The relevance prompt of ``generative_yes_no`` rerankers, rendered once with the model's chat template.

Score = logit("yes") - logit("no") for the first answer token. The wording was chosen on hand-written
(query, relevant, irrelevant) triples with SmolLM2-135M-Instruct: of the phrasings tried it ranked the
relevant passage first most often, with the widest margin.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from transformers import PreTrainedTokenizerBase

from .errors import ExportError
from .runtime.encoding import PromptTemplate

RELEVANCE_INSTRUCTION = (
    "Question: {query}\n\nPassage: {passage}\n\nDoes this passage contain the answer to the question? Reply yes or no."
)
ANSWER_WORDS = ("yes", "no")


def render_prompt(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The chat-rendered prompt as ``tritonrag.json`` stores it: template text with a query and a passage slot."""
    if not tokenizer.chat_template:
        raise ExportError("generative_yes_no needs an instruction-tuned model whose tokenizer has a chat template")
    query_slot, passage_slot = PromptTemplate.query_slot, PromptTemplate.passage_slot
    content = RELEVANCE_INSTRUCTION.format(query=query_slot, passage=passage_slot)
    messages = [{"role": "user", "content": content}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise ExportError(f"the chat template rendered a {type(rendered).__name__}, not text")
    counts = (rendered.count(query_slot), rendered.count(passage_slot))
    if counts != (1, 1) or rendered.find(query_slot) > rendered.find(passage_slot):
        raise ExportError(f"the chat template must keep the query then the passage once each; it rendered {rendered!r}")
    return asdict(PromptTemplate(template=rendered))


def answer_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Token ids of "yes" and "no" as the first token of the answer; each must be a single token."""
    ids = []
    for word in ANSWER_WORDS:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ExportError(f"{word!r} is {len(tokens)} tokens for this tokenizer; generative_yes_no needs one")
        ids.append(int(tokens[0]))
    return ids[0], ids[1]
