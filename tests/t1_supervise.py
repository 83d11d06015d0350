"""The restart loop shared by the snapshotter and `lazyfs mount`'s supervisor (lazyfs.daemon.supervise)."""

from __future__ import annotations

import threading

import pytest

from lazyfs.daemon.supervise import RestartPolicy, Supervisor

FAST = dict(watch_interval=0.001, first_delay=0.001, max_delay=0.004)


def test_backoff_doubles_from_an_immediate_first_restart_up_to_the_limit():
    policy = RestartPolicy(first_delay=0.5, max_delay=4.0)
    assert [policy.delay_before(n) for n in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


@pytest.mark.expected_log
def test_a_daemon_that_keeps_failing_to_start_is_given_up_with_one_line(caplog):
    starts = []

    def start():
        starts.append(1)
        raise RuntimeError("no daemon today")

    supervisor = Supervisor(alive=lambda: False, start=start, what="the test daemon",
                            policy=RestartPolicy(**FAST, max_restarts=3))
    assert supervisor.watch() is False and supervisor.gave_up
    assert len(starts) == 3
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors.count("restarting the test daemon failed: no daemon today") == 3
    assert [e for e in errors if "giving up" in e] == [
        "the test daemon keeps dying (3 restarts in a row did not last); giving up"]


def test_restarts_that_work_continue_until_stopped_and_a_stable_run_resets_the_count():
    stop = threading.Event()
    state = {"alive": False, "starts": 0, "checks": 0}

    def alive():
        state["checks"] += 1
        if state["starts"] >= 10:
            stop.set()
        return state["alive"] or state["checks"] % 2 == 0  # dies at every other check

    def start():
        state["starts"] += 1

    lost = []
    # stable_after 0: every run counts as stable, so 10 restarts never reach the limit of 2
    supervisor = Supervisor(alive=alive, start=start, on_lost=lambda: lost.append(1), stop=stop,
                            policy=RestartPolicy(**FAST, max_restarts=2, stable_after=0.0))
    assert supervisor.watch() is True and not supervisor.gave_up
    assert state["starts"] >= 10 and len(lost) >= 10


@pytest.mark.expected_log
def test_stop_during_the_backoff_ends_the_watch_without_giving_up():
    stop = threading.Event()

    def start():
        stop.set()
        raise RuntimeError("failed, and asked to stop")

    supervisor = Supervisor(alive=lambda: False, start=start, stop=stop,
                            policy=RestartPolicy(watch_interval=0.001, first_delay=60.0, max_restarts=5))
    assert supervisor.watch() is True and not supervisor.gave_up
