"""The Gradio app in a real browser: headless Debian Chromium driven by Playwright, against the app
serving tiny models on loopback."""


import pytest

from alpaca_lora.app.page import build_page, launch_kwargs
from alpaca_lora.inference.loading import InferenceModel, inference_settings, load_for_inference

pytestmark = pytest.mark.browser

# Records every distinct value the response box shows, once per animation frame.
WATCH_RESPONSE = """() => { window.seen = []; const poll = () => {
    const box = document.querySelector('#response textarea');
    if (box && box.value !== window.seen[window.seen.length - 1]) window.seen.push(box.value);
    requestAnimationFrame(poll); }; poll(); }"""


def open_app(browser, settings: InferenceModel, free_port):
    page_app = build_page(load_for_inference(settings))
    port = free_port()
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **launch_kwargs())
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    return page_app, page


def test_type_an_instruction_click_generate_see_the_answer_and_the_prompt(browser, fact_adapters, tmp_path, fact,
                                                                          free_port):
    page_app, page = open_app(browser, inference_settings(adapter=str(fact_adapters[16])), free_port)
    try:
        page.locator("#instruction textarea").fill(fact["instruction"])
        page.locator("#generate").click()
        page.wait_for_function("() => document.querySelector('#response textarea').value === 'Quibbletown.'",
                               timeout=60_000)
        page.get_by_text("Prompt sent to the model").click()
        prompt = page.locator("#prompt textarea").input_value()
        loaded = load_for_inference(inference_settings(adapter=str(fact_adapters[16])))
        assert prompt == loaded.prompt(fact["instruction"])
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        assert (tmp_path / "app.png").stat().st_size > 10_000
    finally:
        page_app.close()


def test_text_streams_in_and_stop_stops_it(browser, tiny_model_dir, tmp_path, free_port):
    page_app, page = open_app(browser, inference_settings(model=str(tiny_model_dir)), free_port)
    try:
        page.locator("#instruction textarea").fill("Tell me a long story.")
        page.get_by_label("Max new tokens").last.fill("1024")
        page.evaluate(WATCH_RESPONSE)
        page.locator("#generate").click()
        page.wait_for_function("() => window.seen.filter(v => v.length > 0).length >= 3", timeout=60_000)
        page.locator("#stop").click()
        page.wait_for_timeout(500)
        stopped = page.locator("#response textarea").input_value()
        page.wait_for_timeout(1500)
        assert page.locator("#response textarea").input_value() == stopped  # it no longer grows
        growing = [v for v in page.evaluate("window.seen") if v]
        assert len(growing) >= 3 and all(b.startswith(a[:-1]) for a, b in zip(growing, growing[1:]))
        page.screenshot(path=str(tmp_path / "streaming.png"), full_page=True)
    finally:
        page_app.close()


def test_decoding_controls_follow_the_mode(browser, tiny_model_dir, free_port):
    from playwright.sync_api import expect

    page_app, page = open_app(browser, inference_settings(model=str(tiny_model_dir)), free_port)
    try:
        temperature = page.get_by_role("slider", name="range slider for Temperature (sample)")
        beams = page.get_by_role("slider", name="range slider for Beams (beam)")
        expect(temperature).to_be_disabled()
        expect(beams).to_be_disabled()
        page.get_by_role("radio", name="sample").check()
        expect(temperature).to_be_enabled()
        expect(beams).to_be_disabled()
        page.get_by_role("radio", name="beam").check()
        expect(temperature).to_be_disabled()
        expect(beams).to_be_enabled()
    finally:
        page_app.close()


def test_the_page_is_behind_its_terms_until_accepted_then_votes_count(browser, fact_adapters, fact, tmp_path,
                                                                       free_port):
    from playwright.sync_api import expect

    from alpaca_lora.app.voting import Terms, Voting
    from alpaca_lora.feedback.store import FeedbackStore

    terms = tmp_path / "terms.md"
    terms.write_text("# Research use only\nAnswers are for research; your votes are kept.\n")
    db = tmp_path / "feedback.sqlite"
    page_app = build_page(load_for_inference(inference_settings(adapter=str(fact_adapters[16]))),
                          voting=Voting(FeedbackStore(db), Terms.read(terms)))
    port = free_port()
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **launch_kwargs())
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.get_by_text("Research use only")).to_be_visible()
        expect(page.locator("#generate")).to_be_hidden()  # nothing to use before the terms are accepted
        page.locator("#accept-terms").click()
        expect(page.locator("#generate")).to_be_visible()
        expect(page.locator("#accept-terms")).to_be_hidden()
        page.locator("#instruction textarea").fill(fact["instruction"])
        page.get_by_label("Max new tokens").last.fill("12")
        page.locator("#generate").click()
        expect(page.locator("#response textarea")).to_have_value(fact["output"], timeout=60_000)
        page.locator("#voter textarea").fill("ann")
        page.locator("#rate-A-up").click()
        expect(page.locator("#feedback-status")).to_contain_text("rated", timeout=30_000)
        (vote,) = FeedbackStore(db).votes()
        assert (vote["choice"], vote["voter"], vote["a_output"], vote["terms"]) == ("up", "ann", fact["output"],
                                                                                   "terms.md")
    finally:
        page_app.close()
