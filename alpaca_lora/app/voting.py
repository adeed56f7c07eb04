"""What the app does with a visit: the terms it must accept first, the answers it was shown, and its votes.

A visit (one browser tab, or one ``gradio_client.Client``) is a small dict kept by Gradio on the server
(``gr.State``): whether and when the visitor accepted the terms, answer A (the last generated) and answer B
(another answer to the same prompt). Votes name an answer of the visit (``A`` or ``B``), never an answer
by its text, so what is stored as "the model's answer" is what the model produced. Without a feedback
database nothing is stored; without terms there is nothing to accept.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.common.paths import sha256_file
from alpaca_lora.feedback.store import RATINGS, Acceptance, Answer, FeedbackStore, now

ANSWERS = ("A", "B")
CHOICES = {"A": "a", "B": "b", "tie": "tie", "bad": "bad"}  # the page's words -> the store's


class Refused(Exception):
    """A request the visit cannot make yet (terms not accepted, nothing to vote on); shown to the visitor."""


@dataclass(frozen=True)
class Terms:
    """A text the visitor must accept before using the page (a research-only licence, say)."""

    name: str
    sha256: str
    text: str

    @classmethod
    def read(cls, path: str | Path) -> Terms:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"key 'terms': cannot read {path}: {exc}") from None
        if not text.strip():
            raise ConfigError(f"key 'terms': {path} is empty")
        return cls(path.name, sha256_file(path), text)


def model_identity(model: str | None, adapter: str | None) -> dict:
    """Which model answered: the base (or merged) model as named, the adapter's path and the hash of its weights
    (a path is reused when a run is trained again; the hash tells the two apart)."""
    weights = Path(adapter or "") / "adapter_model.safetensors"
    return {"model": model, "adapter": adapter,
            "adapter_sha256": sha256_file(weights) if adapter and weights.is_file() else None}


@dataclass
class Voting:
    """The page's feedback: ``store`` (None: votes are not kept), ``terms`` (None: nothing to accept) and the
    identity of the model answering (``model_identity``)."""

    store: FeedbackStore | None = None
    terms: Terms | None = None
    identity: dict = field(default_factory=dict)

    @staticmethod
    def new_visit() -> dict:
        return {"accepted": None, "A": None, "B": None}

    def accept(self, visit: dict) -> dict:
        if self.terms is None:
            return visit
        return {**visit, "accepted": asdict(Acceptance(self.terms.name, self.terms.sha256, now()))}

    def check(self, visit: dict) -> None:
        """Refuses everything but reading the terms until they are accepted."""
        if self.terms is not None and not (visit or {}).get("accepted"):
            raise Refused(f"Please read and accept the terms ({self.terms.name}) first.")

    def answer(self, visit: dict, which: str, instruction: str, input_text: str, prompt: str, output: str,
               template: str, decoding: dict, finish_reason: str | None = None, answer_id: str | None = None) -> dict:
        """The visit with answer ``which`` set (answer A anew forgets B: it answered another prompt)."""
        made = Answer(answer_id or secrets.token_urlsafe(12), now(), instruction, input_text, prompt, output,
                      template, decoding, finish_reason=finish_reason, **self.identity)
        return {**visit, which: asdict(made), **({"B": None} if which == "A" else {})}

    def rate(self, visit: dict, which: str, rating: str, voter: str = "") -> str:
        self.check(visit)
        if which not in ANSWERS or rating not in RATINGS:
            raise Refused(f"Rate answer {' or '.join(ANSWERS)} {' or '.join(RATINGS)}, not {which!r} {rating!r}.")
        answer = self._answer(visit, which)
        self._store().rate(answer, rating, voter, self._accepted(visit))
        return f"Thank you: answer {which} rated {'👍' if rating == 'up' else '👎'}."

    def prefer(self, visit: dict, choice: str, voter: str = "") -> str:
        self.check(visit)
        if choice not in CHOICES:
            raise Refused(f"Choose one of {', '.join(CHOICES)}, not {choice!r}.")
        a, b = self._answer(visit, "A"), self._answer(visit, "B")
        self._store().compare(a, b, CHOICES[choice], voter, self._accepted(visit))
        said = {"A": "A is better", "B": "B is better", "tie": "a tie", "bad": "both are bad"}[choice]
        return f"Thank you: {said}."

    def _answer(self, visit: dict, which: str) -> Answer:
        found = (visit or {}).get(which)
        if not found:
            raise Refused("There is no answer to vote on yet: generate one first." if which == "A" else
                          "There is no second answer yet: ask for another answer first.")
        return Answer(**found)

    def _store(self) -> FeedbackStore:
        if self.store is None:
            raise Refused("Votes are not stored on this server (it was started without feedback_db=).")
        return self.store

    @staticmethod
    def _accepted(visit: dict) -> Acceptance | None:
        accepted = (visit or {}).get("accepted")
        return Acceptance(**accepted) if accepted else None

