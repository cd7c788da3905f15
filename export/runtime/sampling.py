"""Sampling parameters of one generation request, and choosing each next token from the logits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .encoding import InputError

Floats = npt.NDArray[np.float32]
_LARGEST = float(np.finfo(np.float64).max)
MAX_STOP_STRINGS = 8


def _number(params: Mapping[str, Any], key: str, default: float, low: float, high: float, low_open: bool) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{key} must be a number")
    if value > high or value < low or (low_open and value == low):
        raise InputError(f"{key} must be in {'(' if low_open else '['}{low}, {high}]; got {value}")
    return float(value)


def _integer(params: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{key} must be an integer in [{low}, {high}]; got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens: ``temperature`` 0 is greedy; ``top_k`` 0 keeps every token."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    repetition_penalty: float = 1.0

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> SamplingParams:
        """Validate the ``PARAMETERS`` JSON object; unknown keys and bad values are an ``InputError``."""
        if not isinstance(params, Mapping):
            raise InputError("PARAMETERS must be a JSON object")
        unknown = set(params) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise InputError(f"unknown generation parameters: {sorted(unknown)}")
        stop = params.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InputError("stop must be a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise InputError(f"at most {MAX_STOP_STRINGS} stop strings; got {len(stop)}")
        return cls(
            max_tokens=_integer(params, "max_tokens", 1, 1 << 20),
            temperature=_number(params, "temperature", 0.0, 0.0, 2.0, low_open=False),
            top_p=_number(params, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=_integer(params, "top_k", 0, 1 << 20) or 0,
            seed=_integer(params, "seed", 0, 2**63 - 1),
            stop=tuple(stop),
            repetition_penalty=_number(params, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        )


class Sampler:
    """Chooses the next tokens of one sequence; its own random generator makes a seeded run repeatable."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def choose(self, logits: Floats, seen: Sequence[int]) -> int:
        """The next token from ``logits`` ``[vocab]``; ``seen`` (prompt and output) feed the repetition penalty."""
        p = self.params
        scores = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and seen:
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            values = scores[ids]
            with np.errstate(over="ignore"):  # a penalty near 0 overflows: the largest float instead of infinity
                penalized = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            scores[ids] = np.clip(penalized, -_LARGEST, _LARGEST)
        if p.temperature == 0.0:
            return int(np.argmax(scores))
        candidates = np.arange(scores.shape[0])
        if 0 < p.top_k < scores.shape[0]:
            candidates = np.argpartition(-scores, p.top_k - 1)[: p.top_k]
        chosen = scores[candidates]
        order = np.argsort(-chosen, kind="stable")
        candidates, chosen = candidates[order], chosen[order]
        # Scaled from the best score down: a temperature near 0 makes the others -inf (probability 0), never NaN.
        with np.errstate(over="ignore"):
            probs = np.exp((chosen - chosen[0]) / p.temperature)
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self._rng.choice(len(candidates), p=probs)])
