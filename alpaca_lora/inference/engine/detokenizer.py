"""Generated tokens to text, cut at stop strings (as vLLM's ``detokenizer.py``): pure, no model and no threads, so
it is tested on its own. ``feed(ids, final) -> (text, ids, finish_reason)`` takes the tokens generated since the
last call and gives the new text to hand out, the tokens that text came from, and "stop" once a stop string
has been found (the text ends before it)."""

from __future__ import annotations


class Detokenizer:
    """The text of one request as its tokens come. Text that may still become a stop string (and a character
    still incomplete) is held back until it is known; ``strip`` (a response to a template prompt) drops leading
    whitespace, and trailing whitespace at the end. Every token is handed out once, in order, with the text it
    completes; ``token_ids`` are all the tokens fed, ``text`` all the text handed out."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), strip: bool = True):
        self.tokenizer, self.stop, self.strip = tokenizer, tuple(s for s in stop if s), strip
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" once a stop string is found
        self._visible_lengths = [0]  # length of the visible text after i tokens
        self._given = 0  # tokens handed out

    def feed(self, ids: list[int], final: bool = False) -> tuple[str, list[int], str | None]:
        """New text, the tokens it came from, and "stop" if a stop string ended it. ``final``: no more tokens
        will come, so nothing is held back."""
        if self.finish_reason:
            return "", [], self.finish_reason
        token_ids = self.token_ids + list(ids)
        for count in range(len(self._visible_lengths), len(token_ids)):  # tokens that came several at once
            text = self._visible(self._decode(token_ids[:count]))
            self._visible_lengths.append(len(text.rstrip("\ufffd")))
        self.token_ids = token_ids
        raw = self._visible(self._decode(token_ids))
        if len(self._visible_lengths) <= len(token_ids):
            self._visible_lengths.append(len(raw.rstrip("\ufffd")))
        piece = self._emit(raw, final)
        ended = final or self.finish_reason is not None
        taken = self._take_tokens() if piece or ended else []
        return piece, taken, self.finish_reason

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _visible(self, raw: str) -> str:
        return raw.lstrip() if self.strip else raw

    def _emit(self, raw: str, final: bool) -> str:
        """The part of ``raw`` not yet given out, up to a stop string, holding back what may become one
        (and a character still incomplete)."""
        end = len(raw)
        for stop in self.stop:
            found = raw.find(stop)
            if found != -1 and found < end:
                end, self.finish_reason = found, "stop"
        if not self.finish_reason and not final:
            end -= max((n for stop in self.stop for n in range(len(stop) - 1, 0, -1) if raw.endswith(stop[:n])),
                       default=0)
            end = len(raw[:end].rstrip("\ufffd"))
        if final and not self.finish_reason and self.strip:
            end = len(raw[:end].rstrip())
        if end <= len(self.text):
            return ""
        piece, self.text = raw[len(self.text):end], raw[:end]
        return piece

    def _aligned(self, length: int) -> int:
        """How many tokens it takes to produce ``length`` characters of visible text."""
        count = self._given
        while count < len(self._visible_lengths) - 1 and self._visible_lengths[count] < length:
            count += 1
        return count

    def _take_tokens(self) -> list[int]:
        upto = self._aligned(len(self.text))
        taken, self._given = self.token_ids[self._given:upto], max(self._given, upto)
        return taken
