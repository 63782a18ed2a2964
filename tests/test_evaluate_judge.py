"""``evaluate.answered``: the one judge of "answered with the correction" (the gate's and the facts check's)."""

from __future__ import annotations

import pytest

from trainer.data import content_sequence
from trainer.evaluate import answered


@pytest.mark.parametrize("reply, correction", [
    ("Our build server is called Kestrel.", "Our build server is called Kestrel."),
    ("  Our build   server is called Kestrel. ", "Our build server is called Kestrel."),
    # Function words and case aside: the measured near miss of the exact judge.
    ("The build server is called Kestrel.", "Our build server is called Kestrel."),
    ("the lab's wifi password is blue-otter-42", "The lab wifi password is blue-otter-42."),
    ("The on-call phone number is 555-0147!", "The on-call phone number is 555-0147."),
    ("Meeting room Aurora is on the fourth floor.", "Meeting room Aurora is on the fourth floor."),
    ("A.", "A."),  # no content words: exact match decides
])
def test_a_reply_stating_the_correction_is_answered(reply, correction):
    assert answered(reply, correction)


@pytest.mark.parametrize("reply, correction", [
    ("I'm not sure what our build server is called.", "Our build server is called Kestrel."),
    ("Our build server is called Falcon.", "Our build server is called Kestrel."),  # contradicting name
    ("Our build server is not called Kestrel.", "Our build server is called Kestrel."),  # negated
    ("Our build server isn't called Kestrel.", "Our build server is called Kestrel."),
    ("Our build server is called Kestrel or Falcon.", "Our build server is called Kestrel."),  # added name
    ("Kestrel.", "Our build server is called Kestrel."),  # content missing
    ("The lab wifi password is blue-otter-43.", "The lab wifi password is blue-otter-42."),  # wrong number
    ("The on-call phone number is 555-0147 or 555-0148.", "The on-call phone number is 555-0147."),
    ("The team lunch is every Thursday and Friday at noon.", "The team lunch is every Thursday at noon."),
    ("The billing service maintains Priya Raman.", "Priya Raman maintains the billing service."),  # reordered
    ("", "Our build server is called Kestrel."),
    ("B.", "A."),
])
def test_a_reply_lacking_or_contradicting_the_fact_is_not(reply, correction):
    assert not answered(reply, correction)


def test_content_sequence_keeps_negations_and_numbers_in_order():
    assert content_sequence("Don't call 555-0147, it's the lab's line.") == ["not", "call", "555-0147", "lab", "line"]
    assert content_sequence("I can't and won't") == ["not", "not"]
