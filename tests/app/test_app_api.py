"""The app's programmatic API: ``gradio_client`` drives the generate endpoint (nothing in the page's
state may be unpicklable), and the upload route of a page that takes no files is closed."""


import httpx
import pytest

from alpaca_lora.app.page import build_page, launch_kwargs
from alpaca_lora.inference.loading import inference_settings, load_for_inference


@pytest.fixture(scope="module")
def app_url(fact_adapters, free_port):
    page = build_page(load_for_inference(inference_settings(adapter=str(fact_adapters[16]))))
    port = free_port()
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs())
    yield f"http://127.0.0.1:{port}/"
    page.close()


def test_gradio_client_drives_the_generate_endpoint(app_url, fact):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    response, prompt = client.predict(fact["instruction"], "", "greedy", 0.7, 0.9, 40, 4, 20, api_name="/generate")
    assert response == fact["output"] and fact["instruction"] in prompt
    job = client.submit("Tell me a story.", "", "sample", 1.5, 0.9, 40, 4, 8, api_name="/generate")
    assert isinstance(job.result()[0], str)


def test_the_upload_route_is_closed(app_url):
    reply = httpx.post(f"{app_url}gradio_api/upload", files={"files": ("a.txt", b"x" * 1_000_000)})
    assert reply.status_code == 403


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_a_prompt_longer_than_the_context_fails_alone_and_at_once(app_url, fact, mode):
    """Issue 22 item 2: one visitor's 50,000-word input is refused with one line naming the context; the next
    visitor's question is answered (it stalled every visitor for minutes)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    long_one = Client(app_url, verbose=False).submit("a " * 50000, "", mode, 0.7, 0.9, 40, 4, 20,
                                                     api_name="/generate")
    other = Client(app_url, verbose=False)
    response, _ = other.predict(fact["instruction"], "", mode, 0.7, 0.9, 40, 4, 20, api_name="/generate")
    assert response == fact["output"]
    with pytest.raises(AppError, match="context"):
        long_one.result(timeout=60)
