"""Reasoning and answer, apart: DeepSeek-R1, Kimi-K2-Thinking and Qwen3 write their
reasoning between <think> and </think> before the answer. A chat reply of such a
model (its vocabulary has both tags) is split as it streams: the reasoning goes to
its own field (gRPC `Chunk.reasoning`, HTTP `reasoning_content`), the answer to the
text. Whether the reply starts inside the reasoning is read off the prompt: R1's
template ends the generation prompt with `<think>`, so the model never writes it.
"""
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def reasoning_tags(tokenizer):
    """(open id, close id) when the vocabulary has both tags, else None."""
    lookup = getattr(tokenizer, "token_to_id", None)      # None: no vocabulary to look in
    if lookup is None:
        return None
    ids = lookup(THINK_OPEN), lookup(THINK_CLOSE)
    return ids if None not in ids else None


def opens_in_reasoning(prompt_ids, tags):
    """Whether the prompt leaves a <think> open (the reply starts with reasoning)."""
    open_id, close_id = tags
    last_open = last_close = -1
    for i in range(len(prompt_ids) - 1, -1, -1):
        if prompt_ids[i] == open_id and last_open < 0:
            last_open = i
        elif prompt_ids[i] == close_id and last_close < 0:
            last_close = i
        if last_open >= 0 or last_close >= 0:
            break                       # the nearer tag decides
    return last_open > last_close


class ReasoningSplitter:
    """Text deltas -> (reasoning delta, answer delta). A tag split across deltas is held
    back until it completes; `<think>` is recognised only before any answer text (a
    reply that mentions the tag later keeps it as text)."""

    def __init__(self, in_reasoning=False):
        self.in_reasoning = in_reasoning
        self.seen_reasoning = False         # its first text: the newline after <think> goes
        self.seen_answer = False
        self.pending = ""

    def feed(self, delta, final=False):
        text, self.pending = self.pending + delta, ""
        reasoning, answer = [], []
        while text:
            if self.in_reasoning:
                if not self.seen_reasoning:
                    text = text.lstrip("\n")
                    if not text:
                        break
                    self.seen_reasoning = True
                at = text.find(THINK_CLOSE)
                if at < 0:
                    keep = 0 if final else _partial_tag(text, THINK_CLOSE)
                    reasoning.append(text[:len(text) - keep])
                    self.pending = text[len(text) - keep:]
                    break
                reasoning.append(text[:at])
                text = text[at + len(THINK_CLOSE):].lstrip("\n")
                self.in_reasoning = False
            elif self.seen_answer:
                answer.append(text)
                break
            else:                       # before the answer: a <think> may still open
                head = text.lstrip()
                if head.startswith(THINK_OPEN):
                    text = head[len(THINK_OPEN):]
                    self.in_reasoning = True
                elif not final and THINK_OPEN.startswith(head):
                    self.pending = text     # whitespace, or the tag's first characters
                    break
                else:
                    answer.append(head)
                    self.seen_answer = True
                    break
        return "".join(reasoning), "".join(answer)


def _partial_tag(text, tag):
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
