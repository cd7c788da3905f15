"""The continuous-batching engine over a real exported (tiny) decoder graph, without Triton."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from tests.generation import Collected
from tritonrag.export.runtime.encoding import InputError
from tritonrag.export.runtime.engine import BusyError, GenerationEngine, GenerationRequest
from tritonrag.export.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def version_dir(tiny_repository: Path) -> Path:
    return tiny_repository / "generator" / "1"


@pytest.fixture(scope="module")
def tokenizer(version_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(version_dir / "tokenizer.json"))


def engine(version_dir: Path, **limits: Any) -> GenerationEngine:
    return GenerationEngine.from_version_dir(version_dir, threads=1, **limits)


def request(tokenizer: Tokenizer, prompt: str, **params: Any) -> tuple[GenerationRequest, Collected]:
    out = Collected()
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return GenerationRequest(ids, SamplingParams(**params), out.emit, lambda: out.cancelled), out


PROMPTS: list[tuple[str, dict[str, Any]]] = [
    ("Hello", {"max_tokens": 3}),
    ("The weather today is sunny and warm, with a light breeze from the west.", {"max_tokens": 12}),
    ("One two three", {"max_tokens": 7, "temperature": 0.8, "seed": 11}),
    ("A much longer prompt " * 6, {"max_tokens": 9, "temperature": 1.2, "top_k": 20, "seed": 5}),
    ("Question: what is two plus two?", {"max_tokens": 15, "top_p": 0.9, "temperature": 0.7, "seed": 2}),
    ("x", {"max_tokens": 1}),
    ("Repeat after me: la la la", {"max_tokens": 10, "repetition_penalty": 1.3}),
    ("Stop words", {"max_tokens": 20, "temperature": 1.0, "seed": 3, "stop": ["e"]}),
]


def test_each_of_eight_concurrent_requests_gets_what_it_gets_alone(version_dir: Path, tokenizer: Tokenizer) -> None:
    alone = []
    for prompt, params in PROMPTS:
        single = engine(version_dir)
        item, out = request(tokenizer, prompt, **params)
        single.submit(item)
        single.run_until_idle()
        alone.append((item.generated, out.text, out.reason, out.counts))

    batched = engine(version_dir, max_sequences=8)
    items = [request(tokenizer, prompt, **params) for prompt, params in PROMPTS]
    for item, _ in items:
        batched.submit(item)
    batched.run_until_idle()
    together = [(item.generated, out.text, out.reason, out.counts) for item, out in items]

    assert together == alone
    assert batched.max_batch_rows >= 4  # they ran together (one prefill per step; short ones finish early)
    assert [reason for *_, reason, _ in together].count("length") >= 6
    assert together[7][2] == "stop" and "e" not in together[7][1]  # the stop string ended it, unseen


def test_a_new_request_joins_while_others_run(version_dir: Path, tokenizer: Tokenizer) -> None:
    loop = engine(version_dir)
    long, long_out = request(tokenizer, "Tell me a long story", max_tokens=40)
    loop.submit(long)
    for _ in range(5):
        loop.step()
    short, short_out = request(tokenizer, "Hi", max_tokens=3)
    loop.submit(short)
    for _ in range(4):
        loop.step()
    assert short_out.reason == "length" and short_out.counts[1] == 3
    assert long_out.reason is None  # still running when the newcomer finished
    loop.run_until_idle()
    assert long_out.reason == "length" and long_out.counts[1] == 40


def test_cancelling_frees_the_slot_for_a_queued_request(version_dir: Path, tokenizer: Tokenizer) -> None:
    loop = engine(version_dir, max_sequences=1)
    first, first_out = request(tokenizer, "First", max_tokens=100)
    second, second_out = request(tokenizer, "Second", max_tokens=2)
    loop.submit(first)
    loop.submit(second)
    for _ in range(5):
        loop.step()
    produced = len(first.generated)
    assert produced >= 5 and not second.generated  # one slot: the second waits
    first_out.cancelled = True
    loop.run_until_idle()
    assert first_out.reason == "cancelled" and len(first.generated) == produced
    assert second_out.reason == "length" and second_out.counts[1] == 2
    assert loop.max_batch_rows == 1


def test_a_full_queue_refuses_at_once(version_dir: Path, tokenizer: Tokenizer) -> None:
    loop = engine(version_dir, max_queue=2)
    loop.submit(request(tokenizer, "a", max_tokens=2)[0])
    loop.submit(request(tokenizer, "b", max_tokens=2)[0])
    with pytest.raises(BusyError, match="2 requests are waiting already"):
        loop.submit(request(tokenizer, "c", max_tokens=2)[0])


def test_the_kv_budget_bounds_the_batch(version_dir: Path, tokenizer: Tokenizer) -> None:
    loop = engine(version_dir, max_kv_tokens=60)
    items = [request(tokenizer, "Some words here", max_tokens=20) for _ in range(3)]  # 3 + 20 tokens each
    for item, _ in items:
        loop.submit(item)
    loop.run_until_idle()
    assert loop.max_batch_rows == 2  # 2 x 23 fits in 60 slots; 3 x 23 does not
    assert all(out.reason == "length" for _, out in items)
    with pytest.raises(InputError, match="over the KV-cache budget of 60"):
        loop.submit(request(tokenizer, "Some words here", max_tokens=58)[0])


def test_over_long_prompts_are_cut_from_the_start_or_rejected(version_dir: Path, tokenizer: Tokenizer) -> None:
    words = " ".join(f"w{i}" for i in range(400))
    cut = engine(version_dir)  # context window 256
    item, out = request(tokenizer, words, max_tokens=6)
    full = tokenizer.encode(words, add_special_tokens=False).ids
    cut.submit(item)
    cut.run_until_idle()
    assert item.prompt_ids == full[len(full) - 250 :]
    assert out.counts == (250, 6)

    strict = engine(version_dir, truncate_prompt=False)
    with pytest.raises(InputError, match=f"the prompt has {len(full)} tokens; with max_tokens 6 it exceeds"):
        strict.submit(request(tokenizer, words, max_tokens=6)[0])
    with pytest.raises(InputError, match="max_tokens 300 leaves no room"):
        strict.submit(request(tokenizer, "hi", max_tokens=300)[0])


def test_a_failed_step_fails_its_sequences_and_the_loop_goes_on(
    version_dir: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = engine(version_dir)
    errors: list[str] = []
    hit, hit_out = request(tokenizer, "Doomed", max_tokens=10)
    hit.fail = errors.append
    loop.submit(hit)
    loop.step()  # prefilled and decoding
    real_step = loop.decoder.step

    def broken(*args: Any) -> Any:
        raise MemoryError("no room for the cache")

    monkeypatch.setattr(loop.decoder, "step", broken)
    loop.step()
    assert errors == ["the generator failed: MemoryError: no room for the cache"] and hit_out.reason is None
    monkeypatch.setattr(loop.decoder, "step", real_step)
    after, after_out = request(tokenizer, "Fine", max_tokens=3)
    loop.submit(after)
    loop.run_until_idle()
    assert after_out.reason == "length" and after_out.counts[1] == 3


INSTRUCTIONS = (
    "You are a careful assistant. Answer the question with the numbered passages below only, cite each passage "
    "you use as [n], and say that you do not know when the passages do not answer it. Passages:\n"
)
PASSAGES = [
    "[1] Triton serves models over HTTP and gRPC.",
    "[1] A canary moves a share of the traffic to a new version.",
    "[1] FAISS searches dense vectors; BM25 ranks by words.",
    "[1] The prefix cache keeps the keys and values of recent prompts.",
]


def generate_each(loop: GenerationEngine, tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """Greedy continuations of ``prompts``, one after the other on ``loop``."""
    outputs = []
    for prompt in prompts:
        item, _ = request(tokenizer, prompt, max_tokens=12)
        loop.submit(item)
        loop.run_until_idle()
        outputs.append(item.generated)
    return outputs


def test_prompts_sharing_a_prefix_reuse_its_cache_and_generate_the_same_tokens(
    version_dir: Path, tokenizer: Tokenizer
) -> None:
    prompts = [f"{INSTRUCTIONS}{passage}\nQuestion: what does it do?\nAnswer:" for passage in PASSAGES]
    shared = len(tokenizer.encode(INSTRUCTIONS, add_special_tokens=False).ids)
    without = engine(version_dir, prefix_cache_bytes=0)
    cached = engine(version_dir)
    assert without.prefix_cache is None and cached.prefix_cache is not None

    assert generate_each(cached, tokenizer, prompts) == generate_each(without, tokenizer, prompts)
    stats = cached.prefix_cache.stats
    assert (stats.hits, stats.misses) == (3, 1)
    block = cached.prefix_cache.block_tokens
    assert stats.saved_tokens >= 3 * (shared // block) * block  # at least the instructions' whole blocks

    # A chat's next turn resends the first turn and its answer: all of it but the last block is reused.
    first = prompts[0]
    [answer] = generate_each(cached, tokenizer, [first])
    follow_up = first + tokenizer.decode(answer) + "\nQuestion: and then?\nAnswer:"
    before = stats.saved_tokens
    assert generate_each(cached, tokenizer, [follow_up]) == generate_each(without, tokenizer, [follow_up])
    first_tokens = len(tokenizer.encode(first, add_special_tokens=False).ids)
    assert stats.saved_tokens - before >= (first_tokens // block) * block


def test_the_prefix_cache_stays_within_its_bytes(version_dir: Path, tokenizer: Tokenizer) -> None:
    loop = engine(version_dir, prefix_cache_bytes=200_000)
    prompts = [f"Prompt number {n}: " + "tokens of a prompt " * 20 for n in range(12)]
    generate_each(loop, tokenizer, prompts)
    assert loop.prefix_cache is not None
    assert 0 < loop.prefix_cache.nbytes <= 200_000
    assert 0 < len(loop.prefix_cache) < len(prompts)  # the oldest were evicted


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(version_dir: Path, tokenizer: Tokenizer) -> None:
    long_prompt = INSTRUCTIONS + " ".join(PASSAGES) * 3 + "\nQuestion: what does the prefix cache keep?\nAnswer:"
    # No drafts: a stream running alone during the prefill would take several tokens in a step.
    chunked = engine(version_dir, prefill_chunk_tokens=16, prefix_cache_bytes=0, speculative_tokens=0)
    running, running_out = request(tokenizer, "Tell me a long story", max_tokens=60)
    chunked.submit(running)
    chunked.step()
    arriving, arriving_out = request(tokenizer, long_prompt, max_tokens=12)
    chunks = -(-len(arriving.prompt_ids) // 16)
    assert chunks >= 8
    chunked.submit(arriving)
    before = len(running.generated)
    for _ in range(chunks - 1):
        chunked.step()
    # Every step fed one chunk of the long prompt and still moved the running stream by one token.
    assert len(running.generated) - before == chunks - 1 and not arriving.generated
    chunked.step()  # the last chunk gives the newcomer its first token; it joins the batch and decodes its second
    assert len(arriving.generated) == 2 and len(running.generated) - before == chunks
    chunked.run_until_idle()

    whole = engine(version_dir, prefill_chunk_tokens=0, prefix_cache_bytes=0)
    assert generate_each(whole, tokenizer, [long_prompt]) == [arriving.generated]
    assert arriving_out.reason == running_out.reason == "length"


def test_speculative_steps_give_the_tokens_of_one_at_a_time(version_dir: Path, tokenizer: Tokenizer) -> None:
    # A running sequence alone checks drafts of earlier tokens (prompt lookup) in one run of the graph: the same
    # tokens greedy, sampled with a seed, with a repetition penalty, and up to a stop string.
    cases: list[tuple[str, dict[str, Any]]] = [
        ("la la la " * 12, {"max_tokens": 40}),
        (" ".join(PASSAGES) * 2, {"max_tokens": 30, "temperature": 0.9, "seed": 4}),
        ("one two three one two three one two", {"max_tokens": 25, "repetition_penalty": 1.2}),
        ("A B C A B C A B", {"max_tokens": 40, "stop": ["C A"]}),
    ]
    speculative, plain = engine(version_dir, prefix_cache_bytes=0), engine(version_dir, speculative_tokens=0)
    assert speculative.limits.speculative_tokens == 8
    for prompt, params in cases:
        outputs = []
        for loop in (speculative, plain):
            item, out = request(tokenizer, prompt, **params)
            loop.submit(item)
            loop.run_until_idle()
            outputs.append((item.generated, out.text, out.reason, out.counts))
        assert outputs[0] == outputs[1]
    assert plain.drafted_tokens == 0
    assert 0 < speculative.accepted_tokens <= speculative.drafted_tokens
    # Each step that took drafts gave several tokens: fewer steps than tokens.
    generated = sum(min(params["max_tokens"], 40) for _, params in cases)
    assert speculative.steps < plain.steps <= generated
