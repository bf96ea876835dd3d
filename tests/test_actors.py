"""The actor core: mailboxes, tell/ask, back-pressure, supervision, stopping."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from flash_actors.actors import Actor, ActorSystem, Forward, RestartPolicy
from flash_actors.errors import ActorStoppedError, AskTimeoutError, MailboxFullError


class Counter(Actor[Any]):
    starts = 0

    def __init__(self) -> None:
        self.value = 0

    async def on_start(self) -> None:
        Counter.starts += 1

    async def receive(self, message: Any) -> Any:
        if message == "get":
            return self.value
        if message == "boom-ask":
            raise ValueError("bad request")
        if message == "crash":
            raise RuntimeError("actor bug")
        self.value += message
        return self.value


class Gate(Actor[Any]):
    """Blocks every message on an event, to observe queues and cancellation."""

    def __init__(
        self, gate: anyio.Event, seen: list[Any], cancelled: list[Any]
    ) -> None:
        self.gate = gate
        self.seen = seen
        self.cancelled = cancelled

    async def receive(self, message: Any) -> Any:
        self.seen.append(message)
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(message)
            raise
        return message


async def test_ask_and_tell_in_order() -> None:
    async with ActorSystem() as system:
        ref = system.spawn(Counter, name="counter")
        await ref.tell(2)
        ref.tell_nowait(3)
        assert await ref.ask(5) == 10
        assert await ref.ask("get") == 10


async def test_ask_error_goes_to_asker_and_actor_keeps_state() -> None:
    async with ActorSystem() as system:
        ref = system.spawn(Counter, name="counter")
        await ref.ask(1)
        with pytest.raises(ValueError, match=r"^bad request$"):
            await ref.ask("boom-ask")
        assert await ref.ask("get") == 1
        assert ref.statistics().restarts == 0


async def test_full_mailbox_pushes_back_and_put_nowait_raises() -> None:
    gate = anyio.Event()
    seen: list[Any] = []
    async with ActorSystem() as system:
        ref = system.spawn(lambda: Gate(gate, seen, []), name="gate", mailbox_size=2)
        ref.tell_nowait(1)
        await anyio.wait_all_tasks_blocked()  # the actor took 1 and waits on the gate
        ref.tell_nowait(2)
        ref.tell_nowait(3)
        with pytest.raises(MailboxFullError, match=r"mailbox of actor 'gate' is full"):
            ref.tell_nowait(4)
        sent = anyio.Event()

        async def sender() -> None:
            await ref.tell(4)
            sent.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            assert not sent.is_set()  # blocked: back-pressure
            assert ref.statistics().queued == 2
            gate.set()
        assert sent.is_set()
    assert seen == [1, 2, 3, 4]


async def test_ask_timeout_withdraws_request() -> None:
    gate = anyio.Event()
    seen: list[Any] = []
    cancelled: list[Any] = []
    async with ActorSystem() as system:
        ref = system.spawn(
            lambda: Gate(gate, seen, cancelled), name="gate", max_concurrency=4
        )
        with pytest.raises(AskTimeoutError, match=r"did not answer within 0.05 s"):
            await ref.ask("slow", timeout=0.05)
        await anyio.wait_all_tasks_blocked()
        assert cancelled == ["slow"]
        gate.set()
        assert await ref.ask("fast", timeout=5) == "fast"


async def test_cancelled_asker_skips_queued_message() -> None:
    gate = anyio.Event()
    seen: list[Any] = []
    async with ActorSystem() as system:
        ref = system.spawn(lambda: Gate(gate, seen, []), name="gate")
        async with anyio.create_task_group() as tg:
            tg.start_soon(ref.ask, "first")
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.01):
                await ref.ask("withdrawn")
            gate.set()
        assert await ref.ask("after") == "after"
    assert seen == ["first", "after"]


async def test_concurrent_actor_handles_many_at_once() -> None:
    gate = anyio.Event()
    seen: list[Any] = []
    results: list[Any] = []
    async with ActorSystem() as system:
        ref = system.spawn(lambda: Gate(gate, seen, []), name="gate", max_concurrency=3)

        async def ask(i: int) -> None:
            results.append(await ref.ask(i))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(ask, i)
            await anyio.wait_all_tasks_blocked()
            assert len(seen) == 3  # at most max_concurrency handlers at once
            assert ref.statistics().in_flight == 3
            gate.set()
    assert sorted(results) == [0, 1, 2, 3, 4]


async def test_crash_restarts_with_fresh_state() -> None:
    Counter.starts = 0
    policy = RestartPolicy(max_restarts=3, backoff_s=0.001)
    async with ActorSystem() as system:
        ref = system.spawn(Counter, name="counter", restart=policy)
        assert await ref.ask(7) == 7
        await ref.tell("crash")  # a tell that raises crashes the actor
        assert await ref.ask("get") == 0  # the restarted instance starts clean
        assert ref.statistics().restarts == 1
        assert Counter.starts == 2


class FailingStart(Actor[Any]):
    async def on_start(self) -> None:
        raise RuntimeError("cannot start")

    async def receive(self, message: Any) -> Any:
        return message


async def test_too_many_crashes_stop_actor_and_fail_waiting_asks() -> None:
    policy = RestartPolicy(max_restarts=2, backoff_s=0.001)
    async with ActorSystem() as system:
        ref = system.spawn(FailingStart, name="failing", restart=policy)
        # the ask waited through the restarts; it fails with the reason the actor cannot start
        with pytest.raises(RuntimeError, match=r"cannot start"):
            await ref.ask("hello", timeout=10)
        await ref.wait_stopped()
        assert ref.statistics().restarts == 2
        with pytest.raises(ActorStoppedError, match=r"actor 'failing' is stopped"):
            await ref.ask("again")


def test_restart_backoff_grows_and_is_capped() -> None:
    policy = RestartPolicy(backoff_s=0.1, backoff_max_s=0.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


class Crashy(Actor[Any]):
    def __init__(self, gate: anyio.Event) -> None:
        self.gate = gate

    async def receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError("actor bug")
        await self.gate.wait()
        return message


async def test_crash_fails_in_flight_asks_then_restarts() -> None:
    gate = anyio.Event()
    errors: list[BaseException] = []
    policy = RestartPolicy(backoff_s=0.001)
    async with ActorSystem() as system:
        ref = system.spawn(
            lambda: Crashy(gate), name="crashy", max_concurrency=4, restart=policy
        )

        async def ask(msg: str) -> None:
            try:
                await ref.ask(msg)
            except ActorStoppedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "waiting-1")
            tg.start_soon(ask, "waiting-2")
            await anyio.wait_all_tasks_blocked()
            await ref.tell("crash")
        assert len(errors) == 2
        assert all(
            "actor 'crashy' crashed: RuntimeError('actor bug')" in str(e)
            for e in errors
        )
        gate.set()
        assert await ref.ask("after", timeout=5) == "after"
        assert ref.statistics().restarts == 1


async def test_leaving_system_with_exception_fails_in_flight_asks() -> None:
    gate = anyio.Event()
    outcome: list[BaseException] = []

    class Boom(Exception):
        pass

    async with anyio.create_task_group() as callers:
        with pytest.raises(Boom):
            async with ActorSystem() as system:
                ref = system.spawn(lambda: Gate(gate, [], []), name="gate")

                async def ask() -> None:
                    try:
                        await ref.ask("never")
                    except ActorStoppedError as exc:
                        outcome.append(exc)

                callers.start_soon(ask)
                await anyio.wait_all_tasks_blocked()
                raise Boom
    assert len(outcome) == 1
    assert isinstance(outcome[0], ActorStoppedError)


class Relay(Actor[Any]):
    def __init__(self, target: Any) -> None:
        self.target = target

    async def receive(self, message: Any) -> Any:
        return Forward(self.target, message)


async def test_forward_answers_original_asker() -> None:
    async with ActorSystem() as system:
        counter = system.spawn(Counter, name="counter")
        relay = system.spawn(lambda: Relay(counter), name="relay")
        assert await relay.ask(4) == 4
        assert await relay.ask("get") == 4


async def test_forward_to_stopped_actor_fails_asker() -> None:
    async with ActorSystem() as system:
        counter = system.spawn(Counter, name="counter")
        relay = system.spawn(lambda: Relay(counter), name="relay")
        counter.stop()
        await counter.wait_stopped()
        with pytest.raises(ActorStoppedError):
            await relay.ask(1)


async def test_graceful_stop_handles_queued_messages_first() -> None:
    async with ActorSystem() as system:
        ref = system.spawn(Counter, name="counter")
        for _ in range(10):
            ref.tell_nowait(1)
        ref.stop()
        await ref.wait_stopped()
        with pytest.raises(ActorStoppedError):
            ref.tell_nowait(1)


class InlineGate(Gate):
    inline = True


async def test_inline_actor_runs_calls_in_the_callers_task() -> None:
    gate = anyio.Event()
    seen: list[Any] = []
    async with ActorSystem() as system:
        ref = system.spawn(
            lambda: InlineGate(gate, seen, []), name="inline", max_concurrency=4
        )
        gate.set()
        assert await ref.ask("first") == "first"  # by the mailbox: the actor is started
        assert ref.inline_ready
        handler_tasks = ref.statistics().in_flight

        async def call(message: str) -> Any:
            return await ref.call(message), anyio.get_current_task().id

        value, task_id = await call("second")
        assert value == "second"
        assert task_id == anyio.get_current_task().id
        assert handler_tasks == ref.statistics().in_flight == 0


async def test_inline_calls_need_a_concurrent_actor() -> None:
    async with ActorSystem() as system:
        ref = system.spawn(lambda: InlineGate(anyio.Event(), [], []), name="single")
        await anyio.wait_all_tasks_blocked()
        assert not ref.inline_ready  # one message at a time: never beside the handler


async def test_graceful_stop_waits_for_inline_calls() -> None:
    gate = anyio.Event()
    results: list[Any] = []
    stopped_first: list[bool] = []
    async with anyio.create_task_group() as tg:
        async with ActorSystem() as system:
            ref = system.spawn(
                lambda: InlineGate(gate, [], []), name="inline", max_concurrency=4
            )
            await anyio.wait_all_tasks_blocked()

            async def call() -> None:
                results.append(await ref.call("in flight"))
                stopped_first.append(ref.is_stopped)

            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert ref.statistics().in_flight == 1
            ref.stop()
            await anyio.wait_all_tasks_blocked()
            assert not ref.is_stopped  # the call in flight holds the stop
            gate.set()
    assert results == ["in flight"]
    assert stopped_first == [False]


async def test_leaving_system_with_exception_fails_inline_calls() -> None:
    cancelled: list[Any] = []
    outcome: list[BaseException] = []

    class Boom(Exception):
        pass

    async with anyio.create_task_group() as callers:
        with pytest.raises(Boom):
            async with ActorSystem() as system:
                ref = system.spawn(
                    lambda: InlineGate(anyio.Event(), [], cancelled),
                    name="inline",
                    max_concurrency=4,
                )
                await anyio.wait_all_tasks_blocked()
                assert ref.inline_ready

                async def call() -> None:
                    try:
                        await ref.call("never")
                    except ActorStoppedError as exc:
                        outcome.append(exc)

                callers.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                raise Boom
    assert cancelled == ["never"]
    assert len(outcome) == 1
    assert isinstance(outcome[0], ActorStoppedError)


async def test_inline_call_after_stop_is_refused() -> None:
    async with ActorSystem() as system:
        ref = system.spawn(
            lambda: InlineGate(anyio.Event(), [], []), name="inline", max_concurrency=4
        )
        await anyio.wait_all_tasks_blocked()
        ref.stop()
        assert not ref.inline_ready
        with pytest.raises(ActorStoppedError):
            await ref.call("late")
