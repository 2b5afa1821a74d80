"""The partner threads of split calls: the job hand-off protocol, failures, switching kernels, fork.

The split kernels' results are pinned by ``test_unit_split`` and
``test_direction_split``; here the protocol of ``numrnn.runtime.sync`` is run
on its own (compiled functions on Python threads), and the partners of
``numrnn.runtime.partners`` with a stand-in kernel and with two real split
kernels taking turns. The kernels are those cases' (the disk cache has them).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
import weakref

import numpy as np
import pytest
from numba import njit
from reference import run_stack
from test_direction_split import CASES as DIRECTION_CASES
from test_grid import _inputs, _run_kernel, _weights, assert_matches_reference
from test_unit_split import CASES as UNIT_CASES

from codegen.targets.cpu_split import partner_tag
from numrnn.runtime import get_kernel, pack_weights, sync
from numrnn.runtime import partners as partners_module
from numrnn.runtime.partners import Partners, partners

TAG = 12345
#: Rounds that keep a partner of these tests waiting for good.
FOREVER = 2**62


def _state(ctl, w=1):
    return int(ctl[w * sync.STRIDE])


def _wait_for(condition, timeout=10.0, pause=0.001):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(pause)


def _waiting_partner(ctl):
    """A thread in ``next_job`` as partner 1 of kernel ``TAG``; its result lands in the returned list."""
    result = []
    thread = threading.Thread(target=lambda: result.append(sync.next_job(ctl, 1, TAG, FOREVER)))
    thread.start()
    _wait_for(lambda: _state(ctl) == TAG)
    return thread, result


def test_a_posted_job_reaches_the_waiting_partner():
    ctl = np.zeros(2 * sync.STRIDE, np.int64)
    thread, result = _waiting_partner(ctl)
    assert sync.post_jobs(ctl, 2, TAG)
    thread.join(timeout=10)
    assert result == [True] and _state(ctl) == sync.RUNNING


def test_a_lead_of_another_kernel_posts_nothing_and_evicts_the_partner():
    ctl = np.zeros(2 * sync.STRIDE, np.int64)
    thread, result = _waiting_partner(ctl)
    assert not sync.post_jobs(ctl, 2, TAG + 1)
    assert _state(ctl) == TAG  # still ready in its own kernel
    sync.evict_partners(ctl, 2)
    thread.join(timeout=10)
    assert result == [False] and _state(ctl) == sync.IDLE


def test_a_lead_reserves_all_of_its_partners_or_none():
    ctl = np.zeros(3 * sync.STRIDE, np.int64)
    ctl[sync.STRIDE] = TAG  # partner 1 ready, partner 2 asleep
    assert not sync.post_jobs(ctl, 3, TAG)
    assert _state(ctl, 1) == TAG and _state(ctl, 2) == sync.IDLE


def test_a_partner_without_jobs_goes_back_to_sleep_by_itself():
    ctl = np.zeros(2 * sync.STRIDE, np.int64)
    assert not sync.next_job(ctl, 1, TAG, sync.PARTNER_WAIT_ROUNDS)
    assert _state(ctl) == sync.IDLE


def test_await_partners_waits_for_a_running_job():
    ctl = np.zeros(2 * sync.STRIDE, np.int64)
    ctl[sync.STRIDE] = sync.RUNNING
    waiter = threading.Thread(target=sync.await_partners, args=(ctl, 2))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()
    sync.set_idle(ctl, 1)
    waiter.join(timeout=10)
    assert not waiter.is_alive()


@njit
def _round_trip(box, a, b, k):
    sync.publish(box, ((a, k), b))
    (c, j), d = sync.receive(box, ((a, k), b))
    return c.sum() + d.sum() + j, c.ctypes.data == a.ctypes.data


def test_a_published_job_is_received_as_views_of_the_same_arrays():
    box = np.zeros(sync.BOX_BYTES, np.uint8)
    a, b = np.arange(6.0).reshape(2, 3), np.ones(4, np.float32)
    total, same = _round_trip(box, a, b, 7)
    assert total == 15 + 4 + 7 and same


def test_a_job_too_large_for_a_box_is_refused_when_compiled():
    scope = {"sync": sync}
    exec(f"def publish_many(box, a):\n    sync.publish(box, ({'a, ' * 200}))", scope)  # 200 arrays: ~17 KB
    publish_many = njit(scope["publish_many"])
    with pytest.raises(Exception, match="does not fit a partner's box"):
        publish_many(np.zeros(sync.BOX_BYTES, np.uint8), np.zeros((2, 2, 2)))


def test_a_failing_partner_aborts_the_call_and_its_error_is_raised():
    team = Partners(2)

    def kernel(me, flags, ctl, boxes, role):
        if role == sync.LEAD:
            return False  # no partner ready: the jobs go through the queues
        if role == sync.SERVE:
            raise RuntimeError(f"worker {me} failed")
        sync.await_partners(ctl, 2)  # the lead, as the generated kernels do
        return True

    with pytest.raises(RuntimeError, match="worker 1 failed"):
        team.run(kernel, team.lead_tail(()), 2)
    assert team.flags[sync.ABORT] == 1 and team.ready(1) == sync.IDLE
    team.run(lambda *args: True, team.lead_tail(()), 2)  # no error left over
    assert team.flags[sync.ABORT] == 0


def test_when_the_lead_and_a_partner_fail_the_call_raises_the_leads_error_and_the_next_call_none():
    # The partner's error used to stay behind and come out of the next, successful call.
    team = Partners(2)

    def kernel(me, flags, ctl, boxes, role):
        if role == sync.LEAD:
            return False
        if role == sync.SERVE:
            raise ValueError(f"worker {me} failed")
        sync.await_partners(ctl, 2)
        raise ValueError("worker 0 failed")

    with pytest.raises(ValueError, match="worker 0 failed"):
        team.run(kernel, team.lead_tail(()), 2)
    team.run(lambda *args: True, team.lead_tail(()), 2)


def _stand_in(roles: list):
    """A split kernel's stand-in that records the roles it is called with: its lead finds no partner ready, its
    cold lead waits for them, and a partner returns at once (a served job, or a loop with none to serve)."""

    def kernel(me, flags, ctl, boxes, role):
        roles.append(role)
        if role == sync.LEAD:
            return False
        if role == sync.LEAD_COLD:
            sync.await_partners(ctl, 2)
        else:
            sync.set_idle(ctl, me)
        return True

    return kernel


def test_a_call_that_may_decline_sleeping_partners_wakes_them_and_runs_nothing():
    team, roles = Partners(2), []
    assert not team.run(_stand_in(roles), team.lead_tail(()), 2, decline=True)
    assert team.declined_calls == 1 and team.cold_calls == 0
    _wait_for(lambda: len(roles) == 2)
    assert roles == [sync.LEAD, sync.STANDBY]  # the partner was put in the loop with no job, and nothing ran
    _wait_for(lambda: team.ready(1) == sync.IDLE)


def test_a_partner_that_cannot_stand_by_goes_back_to_sleep_and_fails_no_call(caplog):
    # Its error comes before any job (a compile or a dispatch error in the loop's own call): no call to
    # blame, and no abort word left set for the next call's workers.
    team = Partners(2)

    def kernel(me, flags, ctl, boxes, role):
        if role == sync.STANDBY:
            raise RuntimeError("no loop here")
        return False

    with caplog.at_level("WARNING", logger="numrnn"):
        assert not team.run(kernel, team.lead_tail(()), 2, decline=True)
        _wait_for(lambda: team.ready(1) == sync.IDLE)
        _wait_for(lambda: "no loop here" in caplog.text)
    assert team.flags[sync.ABORT] == 0 and team._errors == [None, None]


def test_a_call_that_may_decline_still_hands_its_jobs_to_partners_awake_in_another_kernel():
    # They wait in compiled code: evicted, they take their jobs at once, without a wake-up from the host.
    team, roles = Partners(2), []
    thread, result = _waiting_partner(team.ctl)  # partner 1's word, ready in another kernel (TAG)
    assert team.run(_stand_in(roles), team.lead_tail(()), 2, decline=True)
    thread.join(timeout=10)
    assert result == [False]  # evicted
    assert team.cold_calls == 1 and team.declined_calls == 0
    assert sorted(roles) == sorted([sync.LEAD, sync.SERVE, sync.LEAD_COLD])


def test_a_call_that_may_decline_waking_partners_declines_them_and_wakes_none():
    team, roles = Partners(2), []
    team.ctl[sync.STRIDE] = sync.WAKING  # on its way to a loop: another call woke it
    assert not team.run(_stand_in(roles), team.lead_tail(()), 2, decline=True)
    assert team.declined_calls == 1 and roles == [sync.LEAD]
    team.ctl[sync.STRIDE] = sync.IDLE


def _split_case(cases, name, change, batch):
    spec = cases[name]
    rng = np.random.default_rng(sorted(cases).index(name))
    weights = _weights(spec, rng)
    x, mask, lengths, initial = _inputs(spec, rng, batch)
    expected = run_stack(spec, weights, x, mask=mask, lengths=lengths, initial_states=initial)
    return dataclasses.replace(spec, **change), (weights, x, mask, lengths, initial), expected


def test_partners_asleep_again_after_a_stand_by_take_the_next_call_cold(monkeypatch):
    # Behind a call longer than their wait, partners put on stand-by sleep again before the next call; declining
    # them again would run every call without them (LSTM(1024) B1 T50, 19 ms serial calls, did).
    monkeypatch.setattr(partners_module, "SLEPT_AGAIN_SECONDS", 60.0)  # however slowly this machine runs the test
    team, roles = Partners(2), []
    assert not team.run(_stand_in(roles), team.lead_tail(()), 2, decline=True)
    _wait_for(lambda: len(roles) == 2 and team.ready(1) == sync.IDLE)  # stood by with no job, asleep again
    assert team.run(_stand_in(roles), team.lead_tail(()), 2, decline=True)
    assert team.declined_calls == 1 and team.cold_calls == 1
    assert sorted(roles[2:]) == sorted([sync.LEAD, sync.SERVE, sync.LEAD_COLD])  # handed over through the queue
    _wait_for(lambda: team.ready(1) == sync.IDLE)
    assert not team.run(_stand_in(roles), team.lead_tail(()), 2, decline=True)  # they ran: declined as before
    assert team.declined_calls == 2


def test_split_kernels_taking_turns_stay_right_and_reuse_ready_partners():
    unit = _split_case(UNIT_CASES, "stack_carry", {"unit_split": 2}, 1)
    direction = _split_case(DIRECTION_CASES, "torch_packed_projection_two_blocks", {"direction_split": True}, 1)
    team = partners()
    for turn in range(6):
        spec, arguments, (expected, expected_states) = (direction, unit)[turn // 2 % 2]  # each kernel twice
        cold = team.cold_calls
        got, got_states = _run_kernel(spec, *arguments)
        assert_matches_reference(spec, got, got_states, expected, expected_states)
        if turn % 2 == 0:
            assert team.cold_calls == cold + 1  # the partner was in the other kernel: evicted, handed the job
    assert team.hot_calls >= 1
    assert team.ready(1) in (partner_tag(direction[0]), sync.IDLE)  # the last kernel's, or asleep


def test_a_sleeping_partner_holds_no_array_of_its_last_call():
    spec, arguments, _ = _split_case(UNIT_CASES, "stack_carry", {"unit_split": 2}, 1)
    team = partners()
    sync.evict_partners(team.ctl, team.workers)  # the call hands the partner its arrays through the queue
    got, _ = _run_kernel(spec, *arguments)
    output = weakref.ref(got if got.base is None else got.base)
    del got
    _wait_for(lambda: team.ready(1) == sync.IDLE)
    time.sleep(0.05)  # the thread returns from the kernel, then from the method that held the job
    gc.collect()
    assert output() is None


def test_partners_put_on_stand_by_take_the_next_call_of_their_kernel_hot():
    spec, arguments, (expected, expected_states) = _split_case(UNIT_CASES, "stack_carry", {"unit_split": 2}, 1)
    weights, x, mask, lengths, initial = arguments
    team, kernel, tag = partners(), get_kernel(spec), partner_tag(spec)
    _run_kernel(spec, *arguments)  # compiled, and the shape's shared buffers kept
    packed = kernel._worker_weights(pack_weights(spec, weights))
    for _attempt in range(20):  # the partner may leave the loop, unserved, before the call below comes
        states = [np.array(s) for cell_states in initial for s in cell_states]
        y = np.full((x.shape[0], 1, spec.output_size), np.nan, spec.dtype)
        lead = (x, mask, *states, *packed, y, kernel._small, *kernel._lead_tail(x.shape[0], x.shape[0], 1, team))
        sync.evict_partners(team.ctl, team.workers)  # asleep in Python
        team.stand_by(kernel.function, lead, 2)
        assert team.ready(1) in (sync.WAKING, tag)
        # Spun, not slept on: a millisecond's sleep, overrun on a busy host, can outlast the partner's
        # wait in the loop (3-4 ms). Every attempt failed in one full run (cause not pinned down).
        _wait_for(lambda: team.ready(1) != sync.WAKING, pause=0)
        assert np.isnan(y).all()  # the job only gave the loop its types: nothing ran
        hot, cold, declined = team.hot_calls, team.cold_calls, team.declined_calls
        if team.run(kernel.function, lead, 2, decline=True) and team.hot_calls == hot + 1:
            break
    assert team.hot_calls == hot + 1, ("cold", team.cold_calls - cold, "declined", team.declined_calls - declined)
    counts = [len(cell.state_names) for cell in spec.cells]
    grouped = [tuple(states[sum(counts[:k]):sum(counts[:k + 1])]) for k in range(len(counts))]
    assert_matches_reference(spec, y, grouped, expected, expected_states)


def test_a_forked_child_makes_its_own_partners():
    spec, arguments, (expected, expected_states) = _split_case(UNIT_CASES, "stack_carry", {"unit_split": 2}, 1)
    weights, x, *rest = arguments
    # The parent's partner is now ready in this kernel, and the kernel keeps the exchange buffers of this
    # shape, stamped with the steps of another input's call, which the child's call must not take for its own.
    _run_kernel(spec, weights, -x, *rest)
    pid = os.fork()
    if pid == 0:
        try:
            got, got_states = _run_kernel(spec, *arguments)
            assert_matches_reference(spec, got, got_states, expected, expected_states)
            os._exit(0)
        finally:
            os._exit(1)
    done = []
    try:
        _wait_for(lambda: done.append(os.waitpid(pid, os.WNOHANG)) or done[-1][0] == pid, timeout=60)
    finally:
        if done[-1][0] != pid:  # a hung child is killed, not left behind
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(done[-1][1]) == 0
