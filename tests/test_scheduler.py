"""The local engine's parts alone: the scheduler (no model) and output processing (a tokenizer, no model)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from tuneloop.engine.base import Completion, Generation, SamplingParams, drain
from tuneloop.engine.output import OutputProcessor, held, sample
from tuneloop.engine.scheduler import ScheduledBatch, Scheduler
from tuneloop.engine.sequence import Sequence, SequenceStatus
from tuneloop.errors import BusyError

pytestmark = pytest.mark.timeout(60)


def seq(rid: str, max_new: int = 8, loop=None, queue=None, **params) -> Sequence:
    return Sequence(
        rid, [1, 2, 3], SamplingParams(max_new_tokens=max_new, **params), max_new, loop, queue, 0.0
    )


def end(batch: ScheduledBatch, s: Sequence, reason: str) -> None:
    """What the output processor does to a row that ends in ``batch``'s step."""
    s.finish(reason)
    batch.ended += 1


# ------------------------------------------------------------------ scheduler


def test_admission_limits_and_busy():
    s = Scheduler(max_batch=2, max_queue=1)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    with pytest.raises(BusyError, match=r"^engine busy: 1 requests queued; try again shortly$"):
        s.add(seq("d"))
    assert s.load() == (1, 2) and s.total_requests == 3

    batch = s.schedule()
    assert batch.is_prefill and batch.seqs == [a, b] and batch.running == [a, b]
    assert (a.status, b.status, c.status) == (
        SequenceStatus.RUNNING,
        SequenceStatus.RUNNING,
        SequenceStatus.WAITING,
    )
    assert s.load() == (1, 2)
    with pytest.raises(BusyError):  # two running, one waiting for a row: the queue is full
        s.add(seq("d"))

    batch = s.schedule()
    assert not batch.is_prefill and batch.seqs == [a, b]  # no free row: the batch decodes

    end(batch, a, "length")
    s.postprocess(batch)
    assert s.running == [b] and a.status is SequenceStatus.FINISHED
    s.add(seq("d"))  # a row is free again
    batch = s.schedule()
    assert batch.is_prefill and batch.seqs == [c] and batch.running == [b, c]


def test_a_prefill_is_followed_by_a_decode():
    s = Scheduler(max_batch=8, max_queue=8)
    a, b, c = seq("a"), seq("b"), seq("c")
    s.add(a)
    assert s.schedule().seqs == [a]
    s.add(b)
    step = s.schedule()
    assert not step.is_prefill and step.seqs == [a]  # a decodes before b is admitted
    step = s.schedule()
    assert step.is_prefill and step.seqs == [b] and step.running == [a, b]
    s.add(c)
    assert not s.schedule().is_prefill
    assert s.schedule().seqs == [c]
    # With nothing running, a newcomer is admitted at once after a prefill.
    s2 = Scheduler(max_batch=8, max_queue=8)
    x, y = seq("x", max_new=1), seq("y")
    s2.add(x)
    first = s2.schedule()
    end(first, x, "length")
    s2.postprocess(first)
    s2.add(y)
    assert s2.schedule().seqs == [y]


def test_cancel_waiting_and_running():
    s = Scheduler(max_batch=1, max_queue=4)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    s.schedule()  # a runs; b and c wait
    s.cancel("b")
    s.cancel("a")
    s.cancel("nobody")
    batch = s.schedule()
    assert batch.cancelled == [b, a]
    assert all(x.status is SequenceStatus.CANCELLED and x.finish_reason == "cancelled" for x in (a, b))
    assert batch.is_prefill and batch.seqs == [c]  # a's row went to c
    assert list(s.waiting) == [] and s.running == [c]
    s.cancel_all()
    assert s.schedule().cancelled == [c] and s.idle


def test_drain_before_an_exclusive_job():
    s = Scheduler(max_batch=4, max_queue=4)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.schedule()
    job = (lambda: None, object())
    s.set_job(job)
    s.add(b)
    for _ in range(3):  # a keeps decoding; b waits for the job
        step = s.schedule()
        assert not step.is_prefill and step.seqs == [a]
        assert s.take_job() is None
    end(step, a, "stop")
    s.postprocess(step)
    assert s.take_job() is job and s.job is None
    assert s.schedule().seqs == [b]  # admission resumes


def test_wait_for_work_wakes_on_a_request_and_on_close():
    s = Scheduler(max_batch=2, max_queue=2)
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(s.wait_for_work()))
    t.start()
    s.add(seq("a"))
    t.join(10)
    assert woke == [True]
    s.schedule()
    s.close()
    assert s.wait_for_work() is False  # closed wins over work left


def test_abort_all_empties_both_queues():
    s = Scheduler(max_batch=1, max_queue=2)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.abort_all() == [a, b]
    assert s.idle and a.finish_reason == "error" and a.status is SequenceStatus.FINISHED


def test_a_failed_step_still_owes_its_cancelled_an_ending():
    s = Scheduler(max_batch=2, max_queue=2)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule()
    s.cancel("a")
    assert s.schedule().cancelled == [a]
    # The step fails before its completions are made: abort_all hands a back too.
    assert s.abort_all() == [b, a]
    assert a.finish_reason == "cancelled" and b.finish_reason == "error"
    # After a step that completed, the cancelled are no longer owed anything.
    c = seq("c")
    s.add(c)
    s.schedule()
    s.cancel("c")
    step = s.schedule()
    s.postprocess(step)
    assert s.abort_all() == []


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_is_random_and_repeatable():
    """Would fail if sampling fell back to greedy: seeds must change the draws."""
    logits = torch.zeros(1, 64)
    logits[0, 5] = 1.0  # greedy always answers 5; at temperature 1 most draws are not 5

    def draws(seed: int, n: int = 12, **params) -> list[int]:
        s = seq("s", temperature=1.0, **params)
        s.generator = torch.Generator().manual_seed(seed)
        return [int(sample([s], logits)[0]) for _ in range(n)]

    runs = {tuple(draws(seed)) for seed in range(4)}
    assert len(runs) == 4  # every seed its own draws
    assert draws(3) == draws(3)  # and a seed repeats
    assert any(t != 5 for run in runs for t in run)
    assert draws(3, top_p=0.01) == [5] * 12  # top-p keeps only the top token
    greedy_seq = seq("g", temperature=0.0)
    assert int(sample([greedy_seq], logits)[0]) == 5


def test_each_row_samples_with_its_own_parameters():
    logits = torch.zeros(3, 64)
    logits[:, 9] = 0.5
    rows = [seq("g"), seq("a", temperature=1.0), seq("b", temperature=1.0)]
    rows[1].generator = torch.Generator().manual_seed(1)
    rows[2].generator = torch.Generator().manual_seed(1)
    got = [sample(rows, logits).tolist() for _ in range(10)]
    assert all(r[0] == 9 for r in got)  # the greedy row stays greedy in a sampled batch
    assert [r[1] for r in got] == [r[2] for r in got]  # same seed, same draws, whatever the row
    assert len({r[1] for r in got}) > 1


# ------------------------------------------------------------------ output


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))  # the tokenizer only, no model


def processor(tokenizer, eos=frozenset({0}), version="v0") -> OutputProcessor:
    return OutputProcessor(tokenizer, set(eos), stream_interval=0, version=lambda: version)


def feed(proc: OutputProcessor, s: Sequence, text: str) -> list:
    """Append ``text``'s tokens one by one, flushing after each as a zero-interval tick does."""
    out: list = []
    for tok in proc.tokenizer(text, add_special_tokens=False)["input_ids"]:
        if s.is_finished:
            break
        proc.append(s, tok, 1.0, out)
        proc.flush(s, out)
    return out


def deltas(out: list) -> list[str]:
    return [d for _, d in out if isinstance(d, str)]


def completion(out: list) -> Completion:
    (done,) = [d for _, d in out if isinstance(d, Completion)]
    return done


@pytest.mark.parametrize("rust_backend", [True, False], ids=["DecodeStream", "decode-all fallback"])
def test_streaming_never_splits_a_character(tokenizer, rust_backend):
    proc = processor(tokenizer)
    if not rust_backend:
        proc.fast = None  # as for a tokenizer without tokenizers' backend
    text = "你好，世界！ café — 🙂 done"
    s = seq("x", max_new=100)
    out = feed(proc, s, text)
    got = deltas(out)
    assert "".join(got) == text and len(got) > 3
    assert not any("\ufffd" in d for d in got)
    assert s.text == text and not s.is_finished


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    proc = processor(tokenizer)
    s = seq("x", max_new=100, stop=("world", "zzz"))
    out = feed(proc, s, "Hello there, world and more")
    done = completion(out)
    assert (done.finish_reason, done.text) == ("stop", "Hello there, ")
    assert "".join(deltas(out)) == "Hello there, "  # no "wor" leaked while it was undecided
    assert s.status is SequenceStatus.FINISHED and done.model_version == "v0"


def test_held_back_text_is_released_at_the_end(tokenizer):
    proc = processor(tokenizer)
    text = "say hello wor"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    s = seq("x", max_new=n, stop=("world",))
    out = feed(proc, s, text)
    done = completion(out)
    assert done.finish_reason == "length" and done.completion_tokens == n
    assert done.text == "".join(deltas(out)) == text  # "wor" held back, then sent: it began no stop


def test_held_back_stop_prefix():
    assert held("hello wor", ("world",)) == 3
    assert held("hello", ("xyz",)) == 0
    assert held("ab", ("abc", "b!")) == 2


def test_eos_ends_a_reply_unless_ignored(tokenizer):
    proc = processor(tokenizer, eos={7})
    out: list = []
    s = seq("x")
    proc.append(s, 7, 1.0, out)
    assert completion(out).finish_reason == "stop" and s.tokens == []
    ignoring = seq("y", max_new=2, ignore_eos=True)
    out = []
    proc.append(ignoring, 7, 1.0, out)
    proc.append(ignoring, 7, 1.0, out)
    assert completion(out).finish_reason == "length" and ignoring.tokens == [7, 7]


def test_a_cancelled_reply_is_what_was_sent(tokenizer):
    proc = processor(tokenizer)
    s = seq("x", max_new=100, stop=("world",))
    out = feed(proc, s, "hello wor")  # "wor" is held back: it may begin the stop string
    s.cancel_requested = True
    proc.append(s, tokenizer("ld", add_special_tokens=False)["input_ids"][0], 2.0, out)
    done = completion(out)
    assert done.finish_reason == "cancelled" and s.status is SequenceStatus.CANCELLED
    assert done.text == "".join(deltas(out)) == "hello "


async def test_process_and_deliver_to_the_event_loop(tokenizer):
    """A step's results reach the request's asyncio queue from the engine thread."""
    loop = asyncio.get_running_loop()
    proc = processor(tokenizer, eos={0})
    word = tokenizer("hi", add_special_tokens=False)["input_ids"]
    a = seq("a", max_new=len(word), loop=loop, queue=asyncio.Queue())
    b = seq("b", loop=loop, queue=asyncio.Queue())
    b.finish("cancelled")

    def engine_thread() -> None:
        for i, tok in enumerate(word):
            logits = torch.zeros(1, len(tokenizer))
            logits[0, tok] = 1.0  # greedy picks it
            proc.process(ScheduledBatch([a], i == 0, [a], [b] if i == 0 else []), logits)
            proc.deliver()

    await loop.run_in_executor(None, engine_thread)
    ga, gb = Generation("a", None), Generation("b", None)
    ga.deltas, gb.deltas = drain(a.queue, ga, lambda: None), drain(b.queue, gb, lambda: None)
    assert "".join([d async for d in ga]) == "hi" and ga.result.finish_reason == "length"
    assert [d async for d in gb] == [] and gb.result.finish_reason == "cancelled"
    assert gb.result.model_version == "v0"  # never prefilled: the version served now
    assert proc.total_tokens == len(word)
