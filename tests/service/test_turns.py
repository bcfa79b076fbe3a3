"""``service.turns``: a few turns at a time, a few more waiting, the rest refused at once."""

from __future__ import annotations

import threading

import pytest

from service.turns import Busy, ClientGone, Turns

from .conftest import wait_until


def test_one_turn_one_waiting_and_the_next_refused_at_once():
    turns = Turns(at_once=1, waiting=1, wait_s=30)
    holding, release = threading.Event(), threading.Event()
    outcomes: list[str] = []

    def hold() -> None:
        with turns.turn():
            holding.set()
            release.wait(10)

    def ask() -> None:
        try:
            with turns.turn():
                outcomes.append("served")
        except Busy:
            outcomes.append("busy")

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    askers = [threading.Thread(target=ask) for _ in range(2)]
    for asker in askers:
        asker.start()
    # One takes the one place to wait; the other is refused while the turn is still held.
    wait_until(lambda: sum(asker.is_alive() for asker in askers) == 1, 10, "one asker refused")
    assert outcomes == ["busy"]
    release.set()
    for thread in (holder, *askers):
        thread.join(10)
    assert sorted(outcomes) == ["busy", "served"]


def test_a_wait_that_ends_without_a_turn_is_busy_and_frees_its_place():
    turns = Turns(at_once=1, waiting=1, wait_s=0.2)
    with turns.turn():
        for _ in range(2):  # the first wait gave its place back
            with pytest.raises(Busy), turns.turn():
                pass
    with turns.turn():
        pass


def test_a_client_that_hung_up_leaves_the_line_and_runs_nothing():
    turns = Turns(at_once=1, waiting=1, wait_s=30)
    hung_up = threading.Event()
    outcomes: list[str] = []

    def wait() -> None:
        try:
            with turns.turn(hung_up.is_set):
                outcomes.append("ran")
        except ClientGone:
            outcomes.append("gone")

    with turns.turn():
        waiter = threading.Thread(target=wait)
        waiter.start()
        hung_up.set()
        waiter.join(10)  # it leaves within a check, long before the 30 s wait ends
        assert outcomes == ["gone"]
    with pytest.raises(ClientGone), turns.turn(lambda: True):  # a free turn: not run either
        pass
    with turns.turn():  # and given back
        pass
