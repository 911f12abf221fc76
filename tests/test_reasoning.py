"""Reasoning and answer apart, as text streams in any split."""
import pytest

from moed.engine.reasoning import ReasoningSplitter, opens_in_reasoning, reasoning_tags

REPLY = "<think>\nfirst, foxes.\nthen </thi dogs.\n</think>\n\nFoxes are quick."


def split(deltas, opened=False):
    r = ReasoningSplitter(opened)
    parts = [r.feed(d) for d in deltas] + [r.feed("", final=True)]
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 1000])
def test_any_split_gives_the_same_parts(size):
    deltas = [REPLY[i:i + size] for i in range(0, len(REPLY), size)]
    assert split(deltas) == ("first, foxes.\nthen </thi dogs.\n", "Foxes are quick.")


def test_prompt_opened_reasoning():
    """R1's template ends the prompt with <think>: the reply starts inside it."""
    assert split(["so, foxes", ".</think>\n", "Quick."], opened=True) == ("so, foxes.", "Quick.")


def test_no_tags_is_all_answer():
    assert split(["Just ", "an answer <think> here"]) == ("", "Just an answer <think> here")
    assert split(["  <", "b>bold"]) == ("", "<b>bold")


def test_unclosed_reasoning_stays_reasoning():
    assert split(["<think>still thinking", " <"]) == ("still thinking <", "")


def test_which_prompts_open_reasoning():
    tags = (7, 8)
    assert opens_in_reasoning([1, 2, 7], tags)
    assert opens_in_reasoning([1, 7, 3, 4], tags)
    assert not opens_in_reasoning([1, 7, 3, 8, 5], tags)
    assert not opens_in_reasoning([1, 2, 3], tags)


def test_tags_come_from_the_vocabulary():
    class Vocab:
        def __init__(self, known):
            self.known = known

        def token_to_id(self, token):
            return self.known.get(token)
    assert reasoning_tags(Vocab({"<think>": 5, "</think>": 6})) == (5, 6)
    assert reasoning_tags(Vocab({"<think>": 5})) is None
    assert reasoning_tags(object()) is None
