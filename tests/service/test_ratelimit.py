"""The per-key token buckets, on a clock the test moves."""

from __future__ import annotations

from service.ratelimit import RateLimited, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_one_request_per_token_refilled():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=2.0, burst=3, clock=clock)
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") == 0.5  # the next token comes in half a second
    assert buckets.take("other") == 0.0  # each key has its own bucket
    clock.now += 0.5
    assert buckets.take("k") == 0.0
    assert buckets.take("k") == 0.5
    clock.now += 60  # idle: the bucket refills to the burst, not beyond
    assert [buckets.take("k") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_memory_stays_bounded_without_forgetting_a_key_that_is_still_limited():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1.0, burst=2, clock=clock, max_keys=3)
    for _ in range(2):
        buckets.take("busy")  # empty now
    for key in ("a", "b"):
        buckets.take(key)
    clock.now += 10  # "a" and "b" have refilled; "busy" too, so spend it again
    for _ in range(2):
        buckets.take("busy")
    buckets.take("c")  # a fourth key: past the bound, the full buckets go
    assert buckets.take("busy") > 0  # still limited: its empty bucket was kept
    assert len(buckets._buckets) <= 3


def test_a_refusal_asks_for_at_least_a_whole_second():
    assert RateLimited("slow down", 0.2, "key").retry_after_s == 1
    assert RateLimited("slow down", 2.1, "key").retry_after_s == 3
