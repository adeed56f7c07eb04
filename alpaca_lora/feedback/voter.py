"""A scripted visitor of ``alpaca-lora app`` who prefers correct answers, for ``make demo-feedback``.

It uses the app as a person would, through its API (``gradio_client``): accepts the terms, asks an instruction
whose answer can be checked (the built-in skills set) and rates the answer. Then it asks for another answer and
rates it; when the first answer was wrong it asks again, up to ``retries`` more times, until one is right (as a
visitor regenerates a bad answer). Last it says which of the first and the last answer is better: a correct answer
beats a wrong one; two correct answers are a tie, two wrong ones are both bad.
"""

from __future__ import annotations

import threading
from collections import Counter

from alpaca_lora.evaluate.exact_match import is_exact_match

OUTCOMES = {(True, True): "tie", (True, False): "A", (False, True): "B", (False, False): "bad"}


class ScriptedVoter:
    def __init__(self, url: str, name: str, max_new_tokens: int = 32, temperature: float = 1.0, retries: int = 2):
        from gradio_client import Client

        self.client, self.name = Client(url, verbose=False), name
        self.max_new_tokens, self.temperature, self.retries = max_new_tokens, temperature, retries
        if "/accept_terms" in self.client.view_api(print_info=False, return_format="dict")["named_endpoints"]:
            self.client.predict(api_name="/accept_terms")

    def vote(self, item: dict) -> str:
        """Votes on the greedy answer (A) and sampled ones (B) to ``item``; returns the comparison cast."""
        first, _ = self.client.predict(item["instruction"], item["input"], "greedy", 0.7, 0.9, 0, 4,
                                       self.max_new_tokens, api_name="/generate")
        right = is_exact_match(first, item["output"])
        self.client.predict("A", "up" if right else "down", self.name, api_name="/rate")
        for _ in range(1 + (0 if right else self.retries)):
            second = self.client.predict(self.temperature, 1.0, 0, self.max_new_tokens, api_name="/another_answer")
            other = is_exact_match(second, item["output"])
            self.client.predict("B", "up" if other else "down", self.name, api_name="/rate")
            if other:
                break
        choice = "tie" if first.strip() == second.strip() else OUTCOMES[(right, other)]
        self.client.predict(choice, self.name, api_name="/prefer")
        return choice


def vote_on(url: str, items: list[dict], voters: int = 4, **settings) -> Counter:
    """``voters`` visitors at once (the app batches their generations), each voting on its share of ``items``."""
    from tqdm.auto import tqdm

    outcomes, errors, lock = Counter(), [], threading.Lock()
    bar = tqdm(total=len(items), desc="scripted visitors voting", unit="instruction")

    def visit(number: int) -> None:
        try:
            voter = ScriptedVoter(url, f"scripted-voter-{number}", **settings)
            for item in items[number::voters]:
                choice = voter.vote(item)
                with lock:
                    outcomes[choice] += 1
                    bar.update(1)
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=visit, args=(number,)) for number in range(voters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    if errors:
        raise errors[0]
    return outcomes
