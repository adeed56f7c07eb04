"""Generated tokens to text, cut at stop strings (as vLLM's ``detokenizer.py``): pure, no model and no threads, so
it is tested on its own. ``feed(ids, final) -> (text, ids, finish_reason)`` takes the tokens generated since the
last call and gives the new text to hand out, the tokens that text came from, and "stop" once a stop string
has been found (the text ends before it). Also ``TokenBytes``: a token's own bytes, for OpenAI's ``bytes``."""

from __future__ import annotations

import re
from functools import lru_cache

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character not complete yet


class Detokenizer:
    """The text of one request as its tokens come, decoded incrementally (a window of a few tokens, as vLLM's
    ``detokenize_incrementally``: byte-level tokens that split a character give text once it is whole).
    Stop strings are matched on whole characters; text that may still become one is held back until it is
    known. ``strip`` (a response to a template prompt) drops leading whitespace, and holds trailing whitespace
    back until text follows (at the end it is dropped). A token is handed out once, with the text it completes;
    tokens that held only stripped whitespace are never handed out. Stop strings count from the text of
    token ``min_tokens + 1`` on. ``token_ids`` are the tokens fed (up to the one that completed a stop string),
    ``text`` the text handed out."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), strip: bool = True, min_tokens: int = 0):
        self.tokenizer, self.strip, self.min_tokens = tokenizer, strip, min_tokens
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" once a stop string is found
        self._decoded = ""  # the whole characters of token_ids
        self._prefix = self._read = 0  # the decoding window: token_ids[_prefix:_read] gave the end of _decoded
        self._lengths: list[int] = []  # the visible text's length after each token
        self._blank: list[bool] = []  # whether everything up to and with each token is stripped whitespace
        self._given = 0  # tokens handed out (or passed over as blank)
        self._stops_from = 0  # where in the visible text stop strings count (after min_tokens tokens)

    @property
    def given(self) -> int:
        """How many tokens have been handed out or passed over (blank)."""
        return self._given

    @property
    def visible(self) -> str:
        return self._decoded.lstrip() if self.strip else self._decoded

    def feed(self, ids: list[int], final: bool = False) -> tuple[str, list[int], str | None]:
        """New text, the tokens it came from, and "stop" if a stop string ended it. ``final``: no more tokens
        will come, so nothing is held back (a character left incomplete shows as U+FFFD)."""
        if self.finish_reason:
            return "", [], self.finish_reason
        end = None
        for token in ids:
            end = self._add(token)
            if end is not None:  # a stop string: the tokens after this one are not part of the answer
                break
        if end is None and final:
            self._flush()
        if end is None:
            end = len(self.visible) if final else self._safe_end()
            if final and self.strip:
                end = len(self.visible[:end].rstrip())
        piece = self.visible[len(self.text):end] if end > len(self.text) else ""
        self.text += piece
        return piece, self._take(), self.finish_reason

    def _add(self, token: int) -> int | None:
        """Takes one token; where the visible text ends if it completed a stop string."""
        self.token_ids.append(token)
        self._decoded += self._next_text(final=False)
        visible = self.visible
        self._lengths.append(len(visible))
        self._blank.append(self.strip and not visible and self._read == len(self.token_ids))
        if len(self.token_ids) <= self.min_tokens:
            self._stops_from = len(visible)
            return None
        found = [at for stop in self.stop if (at := visible.find(stop, self._stops_from)) != -1]
        if not found:
            return None
        self.finish_reason = "stop"
        return max(min(found), len(self.text))

    def _next_text(self, final: bool) -> str:
        """The text the tokens past the window's read point add, once their characters are whole (or ``final``)."""
        before = self._decode(self.token_ids[self._prefix:self._read])
        after = self._decode(self.token_ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        return after[len(before):]

    def _flush(self) -> None:
        """The end: whatever the last tokens gave, a character left incomplete included."""
        pending = self._read
        if pending < len(self.token_ids):
            self._decoded += self._next_text(final=True)
            self._lengths[pending:] = [len(self.visible)] * (len(self.token_ids) - pending)

    def _safe_end(self) -> int:
        """How much of the visible text can be handed out: not a tail that may become a stop string, nor
        (with ``strip``) trailing whitespace."""
        visible = self.visible
        end = len(visible)
        if len(self.token_ids) > self.min_tokens:
            end -= max((n for stop in self.stop for n in range(len(stop) - 1, 0, -1)
                        if visible.endswith(stop[:n]) and end - n >= self._stops_from), default=0)
        if self.strip:
            end = len(visible[:end].rstrip())
        return max(end, len(self.text))

    def _take(self) -> list[int]:
        """The tokens it took to produce the text handed out so far and not handed out yet, but the blank ones."""
        upto = self._given
        while upto < len(self.token_ids) and (self._lengths[upto - 1] if upto else 0) < len(self.text):
            upto += 1
        taken = [t for i, t in enumerate(self.token_ids[self._given:upto], self._given) if not self._blank[i]]
        self._given = upto
        return taken

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, reversed: each of the 256 printable stand-in characters -> its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback


class TokenBytes:
    """``TokenBytes(tokenizer)(token_id) -> bytes``: the token's own bytes (decoding one token alone gives U+FFFD
    for a piece of a character), from its vocabulary piece: byte-level BPE's stand-in characters, sentencepiece's
    ``<0xNN>`` and ``▁``; added and special tokens are their text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        parts = [backend.decoder, backend.pre_tokenizer] if backend is not None else []
        self.byte_level = any("ByteLevel" in repr(part) for part in parts if part is not None)
        self.special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if (found := self._cache.get(token_id)) is None:
            found = self._cache[token_id] = self._bytes(token_id)
        return found

    def is_special(self, token_id: int) -> bool:
        return self.tokenizer.convert_ids_to_tokens(token_id) in self.special

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if piece in self.special:
            return piece.encode("utf-8")
        table = _byte_decoder()
        if self.byte_level and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece or not self.byte_level:
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")
