"""Prompt-injection heuristics: a few patterns of text that tries to take over the generator's instructions.

A retrieved passage becomes part of the generator's prompt, so a document that says "ignore the previous
instructions" or carries a chat template's role tags can steer the answer; a query can try the same. Each
rule is a regular expression over a normalised text: Unicode NFKC, case-folded, format characters (zero
width, bidirectional controls, soft hyphens) removed; between the words of a phrase, any run of whitespace
and punctuation, so "Ignore *all*  previous\\ninstructions" matches.
They are heuristics: they catch the common phrasings, not a determined attacker, and never replace
treating passages as data.

``query.injection.mode`` says what a match does (``InjectionGuard``); every match is counted in
``tritonrag_injection_flags_total``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from tritonrag.clients.wire.schema import FlaggedPassage, SearchHit

from ..config import InjectionMode, InjectionSettings
from ..errors import InvalidArgumentError

FLAGS = Counter(
    "tritonrag_injection_flags",
    "Prompt-injection rule matches, by target (query, passage), rule and action taken (flagged, dropped, blocked)",
    ["target", "rule", "action"],
)


@dataclass(frozen=True)
class Rule:
    """A named pattern, and what it catches."""

    name: str
    description: str
    pattern: re.Pattern[str]


def _phrase(words: str) -> re.Pattern[str]:
    """A pattern of words whose every space matches any run of whitespace and punctuation.

    It starts with its first word's alternatives, not a word boundary: Python's regular expressions then skip
    to where such a word can start (three times as fast on prose), at the cost of matching a word's end too.
    """
    return re.compile(words.replace(" ", r"[\W_]+"))


_VERBS = r"(?:ignore|disregard|forget|override|bypass)"
_DETERMINERS = r"(?:(?:all|any|every|each|the|your|my|of|these|those|its) ){0,3}"
_EARLIER = r"(?:previous|prior|preceding|above|earlier|former|original|initial|system|developer)"
_ORDERS = r"(?:instructions?|directions?|prompts?|rules|guidelines|commands?|directives?|context|guidance|constraints)"
_REQUESTS = r"(?:reveal|show|print|repeat|output|display|leak|disclose|dump|tell me|give me|what (?:is|are|was|were))"

RULES: tuple[Rule, ...] = (
    Rule(
        "ignore_instructions",
        'Tells the model to drop its instructions: "ignore all previous instructions", "disregard the system '
        'prompt", "forget everything above".',
        _phrase(
            rf"{_VERBS} (?:{_DETERMINERS}{_EARLIER} (?:\w+ )?{_ORDERS}\b"
            r"|(?:everything|anything|all) (?:above|before|previously|you (?:were|ve been|have been) told)\b)"
        ),
    ),
    Rule(
        "new_instructions",
        'Gives the model replacement orders: "your new instructions are", "new system prompt:", "from now on you '
        'will".',
        _phrase(
            r"(?:your|the) (?:new|real|actual|updated) (?:instructions|orders|task|system prompt) (?:are|is|will be)\b"
            r"|new system prompt\b|from now on (?:you (?:will|must|shall|are|should)|ignore|disregard)\b"
        ),
    ),
    Rule(
        "role_override",
        'Recasts the model: "you are now an unrestricted assistant", "act as an unfiltered AI", "developer mode '
        'enabled".',
        _phrase(
            r"you are (?:now|no longer) (?:an? |the |my )?(?:\w+ ){0,3}"
            r"(?:assistant|ai|model|chatbot|bot|persona|character|agent|llm|dan)\b"
            r"|(?:act|behave|respond|answer) as (?:if you (?:are|were) )?(?:an? )?"
            r"(?:unrestricted|unfiltered|uncensored|jailbroken|evil)\b"
            r"|(?:developer|dan|god|jailbreak) mode (?:is )?(?:now )?(?:enabled|activated|on)\b"
        ),
    ),
    Rule(
        "prompt_leak",
        'Asks for the hidden prompt: "reveal your system prompt", "print the initial instructions".',
        _phrase(
            rf"{_REQUESTS} (?:me )?(?:your|the) (?:full |entire |exact |complete )?"
            r"(?:system (?:prompt|message|instructions)|(?:initial|original|hidden|secret) (?:prompt|instructions))\b"
        ),
    ),
    Rule(
        "role_tag",
        "A chat template's role or turn markers inside the text: <|im_start|>, <|system|>, <|eot_id|>, [INST], "
        "<<SYS>>, <start_of_turn>, <system>, ### System: and the like.",
        re.compile(
            r"<\|(?:im_start|im_end|system|user|assistant|start_header_id|end_header_id|eot_id|endoftext)\|>"
            r"|\[/?inst\]|<</?sys>>|<(?:start|end)_of_turn>|</?(?:system|assistant)>"
            r"|#{2,3}[ \t]*(?:system|instruction|assistant|human|user|response)[ \t]*:"
        ),
    ),
)

_FORMAT = re.compile(r"[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]")


def scan(text: str) -> list[str]:
    """The names of the rules ``text`` matches, in ``RULES`` order."""
    folded = _FORMAT.sub("", unicodedata.normalize("NFKC", text)).casefold()
    return [rule.name for rule in RULES if rule.pattern.search(folded)]


def _scanned(hits: Sequence[SearchHit], action: str) -> list[tuple[SearchHit, list[str]]]:
    """Each hit with the rules its text matches, every match counted with ``action``."""
    scanned = []
    for hit in hits:
        flags = scan(hit.text)
        for rule in flags:
            FLAGS.labels("passage", rule, action).inc()
        scanned.append((hit, flags))
    return scanned


def flag_hits(hits: Sequence[SearchHit]) -> list[SearchHit]:
    """``hits`` with ``flags`` set to the rules each one's text matches."""
    return [hit.model_copy(update={"flags": flags}) if flags else hit for hit, flags in _scanned(hits, "flagged")]


class InjectionGuard:
    """``InjectionSettings.mode`` applied to an answer's query and passages."""

    def __init__(self, settings: InjectionSettings) -> None:
        self.mode = settings.mode

    def check_query(self, text: str, field: str) -> list[str]:
        """The rules ``text`` (the request's ``field``) matches; in ``block`` mode a match is refused
        (``InvalidArgumentError`` naming the rules)."""
        flags = scan(text)
        blocked = bool(flags) and self.mode is InjectionMode.block
        for rule in flags:
            FLAGS.labels("query", rule, "blocked" if blocked else "flagged").inc()
        if blocked:
            raise InvalidArgumentError(f"{field} matches the prompt-injection rule(s) {', '.join(flags)}", field=field)
        return flags

    def screen(self, hits: Sequence[SearchHit]) -> tuple[list[SearchHit], list[FlaggedPassage]]:
        """The hits to give the generator, each with its ``flags``, and those left out for theirs: none in
        ``flag`` mode, every flagged one in ``drop`` and ``block``."""
        if self.mode is InjectionMode.flag:
            return flag_hits(hits), []
        scanned = _scanned(hits, "dropped")
        kept = [hit for hit, flags in scanned if not flags]
        dropped = [FlaggedPassage(doc_id=h.doc_id, chunk_id=h.chunk_id, flags=flags) for h, flags in scanned if flags]
        return kept, dropped
