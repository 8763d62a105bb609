"""Sampling filters and streamed detokenization, independent of any trained model."""

import torch

from fmforge.infer.sampling import SamplingParams, TextStream, process_logits


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.10]]))
    kept = process_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.75 >= 0.7
    kept = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.4)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]  # the top token always stays


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), torch.tensor([[0, 1]]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for streaming multi-byte characters."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stop=()) -> list[str]:
    s = TextStream(ByteTokenizer(), stop)
    pieces = []
    for b in text.encode("utf-8"):
        pieces.append(s.push(b))
        if s.stopped:
            return pieces
    return pieces + [s.flush()]


def test_stream_never_splits_a_character():
    pieces = stream("naïve 日本語 🙂!")
    assert "".join(pieces) == "naïve 日本語 🙂!"
    assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    assert "".join(stream("hello\n\nworld", stop=("\n\n",))) == "hello"
    assert "".join(stream("a<b<c<end>tail", stop=("<end>",))) == "a<b<c"
    assert "".join(stream("partial <en", stop=("<end>",))) == "partial <en"  # released at the end
