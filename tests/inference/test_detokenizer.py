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
    skipped = token_ids[:len(token_ids) - len(given)]  # with strip, tokens of the leading space alone
    assert given == token_ids[len(skipped):] and tiny_tokenizer.decode(skipped).strip() == ""
    assert reason is None and len(pieces) > 3 and (skipped == [] or strip)


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


@pytest.mark.parametrize("stop, expected", [("らら", " as おや・"), ("や・", " as お"), ("・ら", " as おや")])
@pytest.mark.parametrize("at_once", [False, True])
def test_a_stop_string_of_multibyte_characters_leaks_nothing(tiny_tokenizer, stop, expected, at_once):
    """Byte-level tokens split each of these characters in pieces: the stop is found on whole characters."""
    token_ids = ids(tiny_tokenizer, " as おや・らら (and more)")
    assert len(token_ids) > len(" as おや・らら (and more)")  # characters come in several tokens
    detokenizer = Detokenizer(tiny_tokenizer, stop=(stop,), strip=False)
    if at_once:
        text, _, reason = detokenizer.feed(token_ids, final=True)
        pieces = [text]
    else:
        pieces, _, reason = streamed(detokenizer, token_ids)
    assert "".join(pieces) == detokenizer.text == expected and reason == "stop"
    assert "\ufffd" not in "".join(pieces)


def test_with_strip_the_tokens_handed_out_are_exactly_those_of_the_text(tiny_tokenizer):
    """A response's leading and trailing whitespace is stripped: so are the tokens that held only that."""
    lead, body, tail = ids(tiny_tokenizer, "\n\n"), ids(tiny_tokenizer, "おや is it"), ids(tiny_tokenizer, " \n")
    for at_once in (False, True):
        detokenizer = Detokenizer(tiny_tokenizer, strip=True)
        if at_once:
            text, given, _ = detokenizer.feed(lead + body + tail, final=True)
        else:
            pieces, given, _ = streamed(detokenizer, lead + body + tail)
            text = "".join(pieces)
        assert text == detokenizer.text == "おや is it" and given == body
        assert detokenizer.token_ids == lead + body + tail  # all of them were generated (and are counted)


def test_a_tokens_real_bytes(tiny_tokenizer):
    """Each token's own bytes (a piece of a character is not U+FFFD), and special tokens' text."""
    from alpaca_lora.inference.engine import TokenBytes

    token_bytes = TokenBytes(tiny_tokenizer)
    text = " as おや・ら"
    token_ids = ids(tiny_tokenizer, text)
    assert any(tiny_tokenizer.decode([t]) == "\ufffd" for t in token_ids)
    assert b"".join(token_bytes(t) for t in token_ids) == text.encode("utf-8")
    assert token_bytes(tiny_tokenizer.eos_token_id) == tiny_tokenizer.eos_token.encode()
