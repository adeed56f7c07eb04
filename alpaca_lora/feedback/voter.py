"""A scripted visitor of ``alpaca-lora app`` who prefers correct answers, for ``make demo-feedback``.

It uses the app as a person would, through its API (``gradio_client``): accepts the terms, asks an instruction
whose answer can be checked (the built-in skills set), rates the answer, asks for another answer, rates that one,
and says which is better: a correct answer is good and beats a wrong one; two correct answers are a tie, two
wrong ones are both bad.
"""

from __future__ import annotations

import threading
from collections import Counter

from alpaca_lora.evaluate.exact_match import is_exact_match

OUTCOMES = {(True, True): "tie", (True, False): "A", (False, True): "B", (False, False): "bad"}


class ScriptedVoter:
    def __init__(self, url: str, name: str, max_new_tokens: int = 32, temperature: float = 1.0):
        from gradio_client import Client

        self.client, self.name = Client(url, verbose=False), name
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        if "/accept_terms" in self.client.view_api(return_format="dict")["named_endpoints"]:
            self.client.predict(api_name="/accept_terms")

    def vote(self, item: dict) -> str:
        """Votes on the greedy answer (A) and a sampled one (B) to ``item``; returns the comparison cast."""
        first, _ = self.client.predict(item["instruction"], item["input"], "greedy", 0.7, 0.9, 0, 4,
                                       self.max_new_tokens, api_name="/generate")
        second = self.client.predict(self.temperature, 1.0, 0, self.max_new_tokens, api_name="/another_answer")
        right = tuple(is_exact_match(answer, item["output"]) for answer in (first, second))
        for which, correct in zip("AB", right):
            self.client.predict(which, "up" if correct else "down", self.name, api_name="/rate")
        choice = "tie" if first.strip() == second.strip() else OUTCOMES[right]
        self.client.predict(choice, self.name, api_name="/prefer")
        return choice


def vote_on(url: str, items: list[dict], voters: int = 4, **settings) -> Counter:
    """``voters`` visitors at once (the app batches their generations), each voting on its share of ``items``."""
    outcomes, errors, lock = Counter(), [], threading.Lock()

    def visit(number: int) -> None:
        try:
            voter = ScriptedVoter(url, f"scripted-voter-{number}", **settings)
            for item in items[number::voters]:
                choice = voter.vote(item)
                with lock:
                    outcomes[choice] += 1
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=visit, args=(number,)) for number in range(voters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outcomes
