"""The one reply streamer (``bot.replies``): timing on a stepped clock, splitting, and the
reply's references registered in a real store from the first message on; and the adapters'
``handled`` signal."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from bot.adapters.handled import HandledSignal
from bot.replies import EMPTY_REPLY, ReplyStream, split_text
from tests.serving import StepClock
from tuneloop.store import Store

_IDS = itertools.count(100)  # message ids unique across the platforms of a test, as a platform's are


class Platform:
    """A platform's messages, kept as a platform keeps them, with the clock time of every call."""

    def __init__(self, clock: StepClock):
        self.clock = clock
        self.messages: dict[str, str] = {}
        self.calls: list[tuple[float, str, str]] = []  # (clock time, post|edit|delete, ref)

    async def post(self, text: str) -> str:
        ref = str(next(_IDS))
        self.messages[ref] = text
        self.calls.append((self.clock.t, "post", ref))
        return ref

    async def edit(self, ref: str, text: str) -> None:
        assert ref in self.messages, f"edit of unknown message {ref}"
        self.messages[ref] = text
        self.calls.append((self.clock.t, "edit", ref))

    async def delete(self, ref: str) -> None:
        del self.messages[ref]
        self.calls.append((self.clock.t, "delete", ref))


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.db")
    yield s
    s.close()


def pending(store: Store, platform: str = "slack") -> int:
    return store.begin_exchange(platform=platform, user="ann", conversation_id="c1", messages=[],
                                prompt="hi", model_version="base")


async def test_first_text_at_once_then_edits_at_most_once_per_interval(store):
    clock = StepClock(step=0.25)
    platform = Platform(clock)
    stream = ReplyStream(platform, store, max_chars=1000, interval=1.0, clock=clock)
    stream.start(pending(store))
    await stream.add("   ")  # nothing visible yet: nothing posted
    assert platform.calls == []
    for i in range(40):
        await stream.add(f"w{i} ")
    while True:  # end right after an edit, so that the final text has to wait its turn
        edits = len(platform.calls)
        await stream.add("x ")
        if len(platform.calls) > edits:
            break
    text = stream.text + "end"
    await stream.finish(text)
    ops = [op for _, op, _ in platform.calls]
    assert ops[0] == "post" and set(ops[1:]) == {"edit"} and len(ops) >= 5
    times = [t for t, _, _ in platform.calls]
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:], strict=False)), times
    assert len(clock.sleeps) == 1 and 0 < clock.sleeps[0] <= 1.0  # the final edit waited its turn
    assert list(platform.messages.values()) == [text]


async def test_reference_registered_when_the_first_part_is_posted(store):
    clock = StepClock()
    platform = Platform(clock)
    ex_id = pending(store)
    stream = ReplyStream(platform, store, max_chars=1000, clock=clock)
    stream.start(ex_id)
    await stream.add("Hello")
    (ref,) = platform.messages
    # Still streaming: the exchange is pending, and its reply is already known by its message.
    assert store.exchange(ex_id).finish_reason == "pending"
    assert store.exchange_by_ref("slack", ref).id == ex_id


async def test_parts_registered_with_the_anchor_first_or_last(store):
    for anchor in ("first", "last"):
        clock = StepClock()
        platform = Platform(clock)
        ex_id = pending(store, platform="discord")
        stream = ReplyStream(platform, store, max_chars=10, interval=0.0, anchor=anchor, clock=clock)
        stream.start(ex_id)
        for word in "one two three four five six seven".split():
            await stream.add(word + " ")
            # Every message posted so far is already registered.
            assert all(store.exchange_by_ref("discord", ref).id == ex_id for ref in platform.messages)
        refs = await stream.finish(stream.text)
        assert len(refs) >= 3 and list(platform.messages) == refs
        assert all(len(t) <= 10 for t in platform.messages.values())
        assert store.exchange(ex_id).reply_ref == (refs[0] if anchor == "first" else refs[-1])


async def test_failed_reply_replaces_the_partial_text_and_registers_nothing(store):
    clock = StepClock()
    platform = Platform(clock)
    ex_id = pending(store)
    stream = ReplyStream(platform, store, max_chars=10, interval=0.0, clock=clock)
    stream.start(ex_id)
    await stream.add("a partial reply that ran long")
    assert len(platform.messages) >= 2
    store.discard_exchange(ex_id)  # what Chat.respond does when the reply fails
    refs = await stream.finish("Sorry.", failed=True)
    assert list(platform.messages.values()) == ["Sorry."] and len(refs) == 1
    assert [op for _, op, _ in platform.calls].count("delete") >= 1
    assert store.exchange_by_ref("slack", refs[0]) is None


async def test_blank_reply_shows_a_placeholder(store):
    clock = StepClock()
    platform = Platform(clock)
    stream = ReplyStream(platform, store, max_chars=100, clock=clock)
    stream.start(pending(store))
    await stream.add(" \n ")
    refs = await stream.finish(" \n ")
    assert [platform.messages[r] for r in refs] == [EMPTY_REPLY]


def test_split_never_cuts_an_entity():
    pieces = split_text("a&amp;b&amp;c&amp;d&amp;e", 6, keep_whole=re.compile(r"&(?:amp|lt|gt);"))
    assert "".join(pieces) == "a&amp;b&amp;c&amp;d&amp;e"
    assert all(p.count("&") == p.count("&amp;") and len(p) <= 6 for p in pieces)


def test_split_text():
    assert split_text("", 5) == [] and split_text("  \n ", 5) == []
    assert split_text("a" * 10, 4) == ["aaaa", "aaaa", "aa"]
    assert split_text("one two three", 8) == ["one two", "three"]
    text = ("word " * 1000).strip()
    parts = split_text(text, 2000)
    assert all(len(p) <= 2000 for p in parts) and " ".join(parts) == text
    assert split_text(text[:4500], 2000)[:2] == parts[:2]


async def test_handled_signal_wakes_waiters_and_stays_bounded():
    signal = HandledSignal()
    waiter = asyncio.ensure_future(signal.wait("message:1", count=2))
    signal.fire("message:1", "ignored")
    signal.fire("message:2", "replied")
    await asyncio.sleep(0)  # let the waiter look: one of two is not enough
    assert not waiter.done()
    signal.fire("message:1", "replied")
    assert await waiter == ["ignored", "replied"]
    with pytest.raises(TimeoutError, match="0 of 1"):
        await signal.wait("message:3", timeout=0.01)
    for i in range(HandledSignal.KEEP + 5):
        signal.fire(f"event:{i}", "ignored")
    assert len(signal.events) == HandledSignal.KEEP and signal.count() == HandledSignal.KEEP + 8
