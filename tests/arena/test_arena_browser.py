"""The blind arena in a real browser: headless Debian Chromium driven by Playwright, against the arena
on loopback: votes, a restart, more votes, two voters at once, and no generator or file name in the
page or in Gradio's config before a vote."""

import json
import urllib.request

import pytest

from alpaca_lora.arena.__main__ import main
from alpaca_lora.arena.page import ArenaStore, build_arena_page
from alpaca_lora.evaluate.answers import load_answers, pair_answers

pytestmark = pytest.mark.browser

SECRETS = ("secret-gen-alpha", "secret-gen-beta", "alpha_answers_file", "beta_answers_file")
ITEMS = 6




@pytest.fixture
def files(tmp_path):
    paths = []
    for name, word in (("alpha", "sunny"), ("beta", "rainy")):
        path = tmp_path / f"{name}_answers_file.jsonl"
        path.write_text("".join(json.dumps({"id": str(i), "instruction": f"Question {i}?", "input": f"context {i}",
                                            "output": f"{word} answer {i}", "generator": f"secret-gen-{name}"}) + "\n"
                                for i in range(ITEMS)))
        paths.append(path)
    return paths


def launch(db, files, port):
    a, b = (load_answers(str(path)) for path in files)
    page_app = build_arena_page(ArenaStore(db).open_arena(a, b, pair_answers(a, b)[0]))
    page_app.queue(default_concurrency_limit=8).launch(server_name="127.0.0.1", server_port=port,
                                                       prevent_thread_lock=True, quiet=True)
    return page_app


def assert_nothing_revealed(page, port):
    config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config").read().decode()
    html = page.content()
    for secret in SECRETS:
        assert secret not in html and secret not in config


def start(page, name):
    wait_for_status(page, "Enter your name")
    page.locator("#voter textarea").fill(name)
    page.locator("#start").click()
    wait_for_status(page, f"{name}: 0 of {ITEMS} items voted")


def wait_for_status(page, text):
    page.wait_for_function("text => (document.querySelector('#status')?.innerText ?? '').includes(text)",
                           arg=text, timeout=60_000)


def vote(page, name, button, voted_after):
    """Votes on the item shown; returns its instruction."""
    instruction = page.locator("#instruction textarea").input_value()
    assert instruction and page.locator("#response-1 textarea").input_value()
    page.get_by_role("button", name=button, exact=True).click()
    wait_for_status(page, f"{name}: {voted_after} of {ITEMS} items voted")
    return instruction


def test_votes_a_restart_more_votes_and_every_vote_counted(browser, files, tmp_path, free_port):
    db, port = tmp_path / "arena.sqlite", free_port()
    page_app = launch(db, files, port)
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        wait_for_status(page, "Enter your name")
        assert_nothing_revealed(page, port)
        start(page, "ann")
        assert_nothing_revealed(page, port)  # an item is shown, not yet voted on
        assert page.get_by_role("button", name="Response 1 is better").is_enabled()
        for label in ("Response 1 is better", "Response 2 is better", "Tie", "Both are bad"):
            assert page.get_by_role("button", name=label, exact=True).count() == 1
        seen = [vote(page, "ann", button, n) for n, button in
                enumerate(("Response 1 is better", "Response 2 is better", "Tie"), start=1)]
        page_app.close()

        page_app = launch(db, files, port)  # restarted on the same address: the browser remembers the voter
        page.reload()
        wait_for_status(page, f"ann: 3 of {ITEMS} items voted")
        assert page.locator("#voter textarea").input_value() == "ann"
        seen += [vote(page, "ann", button, n) for n, button in
                 enumerate(("Both are bad", "Response 1 is better"), start=4)]
        page.get_by_role("tab", name="Results").click()
        page.wait_for_function("() => (document.querySelector('#results')?.innerText ?? '').includes('5 votes')")
        assert_nothing_revealed(page, port)
        page.screenshot(path=str(tmp_path / "arena.png"), full_page=True)
    finally:
        context.close()
        page_app.close()
    assert len(set(seen)) == 5  # never an item twice
    votes = ArenaStore(db).votes()
    assert [(v["voter"], v["instruction"], v["choice"]) for v in votes] == \
        list(zip(["ann"] * 5, seen, ["1", "2", "tie", "bad", "1"]))
    assert all(v["winner"] == {"1": v["first"], "2": "ab".replace(v["first"], "")}.get(v["choice"], v["choice"])
               for v in votes)
    assert main(["report", f"db={db}", f"output_dir={tmp_path / 'report'}"]) == 0
    [report] = json.loads((tmp_path / "report" / "arena_report.json").read_text())
    assert report["votes"] == 5 and report["wins_a"] + report["wins_b"] + report["ties"] == 5
    assert report["both_bad"] == 1 and report["ties"] >= 2


def test_two_voters_at_once_lose_nothing(browser, files, tmp_path, free_port):
    db, port = tmp_path / "arena.sqlite", free_port()
    page_app = launch(db, files, port)
    contexts = [browser.new_context(), browser.new_context()]
    try:
        pages = [context.new_page() for context in contexts]
        names = ["cleo", "dan"]
        for page, name in zip(pages, names):
            page.goto(f"http://127.0.0.1:{port}/")
            start(page, name)
        for round_number in range(1, ITEMS + 1):
            for page in pages:  # both clicks leave before either answer comes back
                page.get_by_role("button", name="Tie", exact=True).click(no_wait_after=True)
            for page, name in zip(pages, names):
                wait_for_status(page, f"{name}: {round_number} of {ITEMS} items voted" if round_number < ITEMS
                                else f"{name}: you have voted on all {ITEMS} items")
        for page in pages:
            assert page.get_by_role("button", name="Tie", exact=True).is_disabled()
            assert page.locator("#instruction textarea").input_value() == ""
    finally:
        for context in contexts:
            context.close()
        page_app.close()
    votes = ArenaStore(db).votes()
    assert len(votes) == 2 * ITEMS
    assert all(sorted(v["instruction"] for v in votes if v["voter"] == name) == sorted(f"Question {i}?"
               for i in range(ITEMS)) for name in ("cleo", "dan"))
