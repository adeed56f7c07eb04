"""The stop-string detokenizer on its own, with the tiny model's byte-level tokenizer: the pieces it hands out add
up to the text, each token is handed out once and in order, a stop string ends the text before it (streamed token
by token, or all at once), text that may still become a stop string waits."""

import pytest

from alpaca_lora.inference.engine import Detokenizer

TEXT = " The capital of Zorblax is Quibbletown, a city of bridges."


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def streamed(detokenizer: Detokenizer, token_ids: list[int]) -> tuple[list[str], list[int], str | None]:
    """Fed one token at a time, then the end: the pieces, the tokens handed out, the finish reason."""
    pieces, given, reason = [], [], None
    for i, token in enumerate(token_ids):
        piece, taken, reason = detokenizer.feed([token], final=i == len(token_ids) - 1)
        pieces += [piece] if piece else []
        given += taken
        if reason:
            break
    return pieces, given, reason


@pytest.mark.parametrize("strip", [False, True])
def test_pieces_add_up_to_the_text_and_every_token_is_handed_out_once(tiny_tokenizer, strip):
    token_ids = ids(tiny_tokenizer, TEXT)
    detokenizer = Detokenizer(tiny_tokenizer, strip=strip)
    pieces, given, reason = streamed(detokenizer, token_ids)
    assert "".join(pieces) == detokenizer.text == (TEXT.strip() if strip else TEXT)
    assert given == token_ids and reason is None and len(pieces) > 3


@pytest.mark.parametrize("at_once", [False, True])
def test_a_stop_string_ends_the_text_before_it(tiny_tokenizer, at_once):
    token_ids = ids(tiny_tokenizer, TEXT)
    detokenizer = Detokenizer(tiny_tokenizer, stop=("town",), strip=False)
    if at_once:
        text, given, reason = detokenizer.feed(token_ids, final=True)
        pieces = [text]
    else:
        pieces, given, reason = streamed(detokenizer, token_ids)
    assert "".join(pieces) == detokenizer.text == " The capital of Zorblax is Quibble" and reason == "stop"
    assert given == token_ids[:len(given)] and tiny_tokenizer.decode(given).startswith(detokenizer.text)
    assert detokenizer.feed(ids(tiny_tokenizer, " more"), final=True) == ("", [], "stop")  # nothing after a stop


def test_text_that_may_become_a_stop_string_waits(tiny_tokenizer):
    detokenizer = Detokenizer(tiny_tokenizer, stop=("Zorblax is Paris",), strip=False)
    text, _, _ = detokenizer.feed(ids(tiny_tokenizer, " The capital of Zorblax is"))
    assert text == " The capital of "  # "Zorblax is" may be the start of the stop string
    text, _, reason = detokenizer.feed(ids(tiny_tokenizer, " Quibbletown."), final=True)
    assert text == "Zorblax is Quibbletown." and reason is None
