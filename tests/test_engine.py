"""The model worker's scheduling on a tiny llama: requests for the running version join its
batch between decode steps (continuous batching) and still answer exactly what they answer
alone; a request for another version closes admission after `max_wait_s` and is served once
the batch drains; controls wait for the batch too."""

from __future__ import annotations

import time

import mlx.core as mx
import pytest

from mondrian.engine import ModelWorker
from tests.helpers import write_random_adapter

ADV = "fit-query"
PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 7, 2, 30, 11], [1, 40, 2], [1, 3, 5, 7, 11, 13, 17]]


class Slow:
    """A logits processor that keeps a row going (no stop token) and slows each step, so a
    test can tell which rows decoded together. Greedy over the other tokens is unchanged."""

    def __init__(self, eos: list[int], delay_s: float = 0.01):
        self.eos, self.delay_s = eos, delay_s

    def __call__(self, context, logits):
        time.sleep(self.delay_s)
        mask = mx.zeros(logits.shape[-1], dtype=mx.bool_)
        mask[self.eos] = True
        return mx.where(mask, mx.array(-float("inf"), dtype=logits.dtype), logits)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("engine")
    w = ModelWorker("tiny", tiny_llama.path, tiny_llama.fingerprint, max_batch=4, max_wait_s=0.0)
    w.wait_ready(120)
    for seed, v in ((1, "v1"), (2, "v2")):
        w.load(ADV, v, write_random_adapter(tmp / v, str(tiny_llama.path), seed=seed, amplitude=0.2))
    yield w
    w.close()


def alone(worker, key, prompt, max_tokens):
    """The answer of one request with nothing else in the queue."""
    return worker.submit(key, prompt, max_tokens, Slow(sorted(worker.tokenizer.eos_token_ids), 0)).result(60)


def wait_running(fut_pending, worker, timeout=30):
    """Until the worker has opened a batch (the first request is decoding)."""
    deadline = time.time() + timeout
    while worker._queue.qsize() and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    assert not fut_pending.done(), "the long request finished before the test could join it"


def test_requests_join_the_running_batch_and_answer_as_alone(worker):
    eos = sorted(worker.tokenizer.eos_token_ids)
    key = (ADV, "v1")
    solo = [alone(worker, key, p, 12).generation.text for p in PROMPTS[1:]]
    worker.max_wait_s = 60.0
    try:
        long = worker.submit(key, PROMPTS[0], 200, Slow(eos))
        wait_running(long, worker)
        late = [worker.submit(key, p, 12, Slow(eos, 0)) for p in PROMPTS[1:]]
        answers = [f.result(60) for f in late]
        first = long.result(60)
    finally:
        worker.max_wait_s = 0.0
    assert [a.generation.text for a in answers] == solo  # joining a batch changes no answer
    assert all(a.batch_size == 4 and a.version == "v1" for a in answers)
    assert first.batch_size == 4 and first.generation.tokens == 200


def test_other_version_closes_admission_and_goes_next(worker):
    eos = sorted(worker.tokenizer.eos_token_ids)
    v1, v2 = (ADV, "v1"), (ADV, "v2")
    solo_v2 = alone(worker, v2, PROMPTS[1], 10).generation.text
    solo_v1 = alone(worker, v1, PROMPTS[2], 10).generation.text
    done_at = {}
    long = worker.submit(v1, PROMPTS[0], 60, Slow(eos))
    wait_running(long, worker)
    other = worker.submit(v2, PROMPTS[1], 10, Slow(eos, 0))
    time.sleep(0.05)
    same = worker.submit(v1, PROMPTS[2], 10, Slow(eos, 0))  # arrives after v2 has waited max_wait_s (0)
    for name, f in (("long", long), ("other", other), ("same", same)):
        f.add_done_callback(lambda _f, n=name: done_at.setdefault(n, time.perf_counter()))
    a_long, a_other, a_same = long.result(60), other.result(60), same.result(60)
    assert done_at["long"] < done_at["other"] < done_at["same"]  # v1 drained, then v2, then v1 again
    assert a_long.batch_size == 1 and a_same.batch_size == 1  # the late v1 request did not join
    assert (a_other.version, a_other.generation.text) == ("v2", solo_v2)
    assert (a_same.version, a_same.generation.text) == ("v1", solo_v1)


def test_controls_wait_for_the_running_batch(worker):
    eos = sorted(worker.tokenizer.eos_token_ids)
    long = worker.submit((ADV, "v1"), PROMPTS[0], 40, Slow(eos))
    wait_running(long, worker)
    seen = worker.call(lambda w: (long.done(), w.active))  # runs only once the batch drained
    assert seen == (True, (ADV, "v1"))
    assert long.result(1).generation.tokens == 40
