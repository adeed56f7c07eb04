"""The generation engine on the tiny model: continuous batching gives what ``generate`` gives, each
request keeps its own settings and stop strings, cancelling frees a place at once, a full engine
refuses, a failing batch neither hangs nor stays broken, and what batching cannot do still works."""

import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from alpaca_lora.inference.engine import (
    Engine,
    EngineError,
    EngineSettings,
    PromptTooLong,
    QueueFull,
    Sampling,
    generate_texts,
)
from alpaca_lora.inference.loading import inference_settings, load_for_inference

PROMPTS = ["What is the capital of Zorblax?", "Give three tips for staying healthy.", "Reverse the order of the words.",
           "Name the capital of the country."]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model, tiny_tokenizer):
    with Engine(model, tiny_tokenizer, EngineSettings(max_batch=4, max_queue=4)) as engine:
        yield engine


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def greedy_reference(model, tokenizer, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """``generate``'s greedy tokens. Never while an engine generates: the model is not safe to run from
    two threads at once next to continuous batching (the engine pauses the batch for its own direct uses)."""
    ids = torch.tensor([prompt_ids])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, top_k=None,
                            top_p=None, temperature=None)
    return output[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_concurrent_greedy_requests_get_what_generate_gives(engine, model, tiny_tokenizer):
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS]
    expected = [greedy_reference(model, tiny_tokenizer, p, 24) for p in prompts]
    requests = [r for p in prompts for r in engine.submit(p, Sampling(max_new_tokens=24))]
    sampled = engine.submit(prompts[0], Sampling(max_new_tokens=24, temperature=1.5, top_p=0.9), n=2)
    for request, tokens in zip(requests, expected):
        assert request.wait().token_ids == tokens
        assert request.finish_reason == "length" and request.completion_tokens == 24
    assert all(r.wait().completion_tokens == 24 for r in sampled)  # sampled neighbours in the same batch
    assert engine.description.startswith("continuous batching")


@pytest.mark.slow
def test_a_sampled_request_switches_the_batch_and_greedy_requests_go_on(model, tiny_tokenizer):
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS]
    expected = [greedy_reference(model, tiny_tokenizer, p, 200) for p in prompts]
    with Engine(model, tiny_tokenizer, EngineSettings(max_batch=4)) as engine:
        greedy = [r for p in prompts for r in engine.submit(p, Sampling(max_new_tokens=200))]
        wait_for(lambda: all(r.token_ids for r in greedy))  # generating
        assert engine.status()["sampling_batch"] is False
        sampled = engine.submit(prompts[0], Sampling(max_new_tokens=10, temperature=1.0))[0]
        assert sampled.wait().completion_tokens == 10 and engine.status()["sampling_batch"] is True
        assert [r.wait().token_ids for r in greedy] == expected


def wait_for(condition, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_text_streams_in_pieces_that_add_up(engine, tiny_tokenizer):
    request = engine.submit(encode(tiny_tokenizer, PROMPTS[1]), Sampling(max_new_tokens=30, strip=False))[0]
    deltas = list(request)
    assert len(deltas) > 3 and "".join(d.text for d in deltas) == request.text
    assert [t for d in deltas for t in d.token_ids] == request.token_ids  # every token, in order, once
    assert request.text == tiny_tokenizer.decode(request.token_ids, skip_special_tokens=True)


def test_a_stop_string_ends_only_its_own_request(engine, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, PROMPTS[1])
    free = engine.submit(prompt, Sampling(max_new_tokens=30, strip=False))[0].wait()
    stop = free.text[8:11]
    cut, uncut = engine.submit(prompt, Sampling(max_new_tokens=30, strip=False, stop=(stop,)))[0], \
        engine.submit(prompt, Sampling(max_new_tokens=30, strip=False))[0]
    assert cut.wait().text == free.text[:free.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < 30 and cut.token_ids == free.token_ids[:cut.completion_tokens]
    assert uncut.wait().text == free.text and uncut.finish_reason == "length"


def test_cancel_frees_the_place_at_once_and_a_full_engine_refuses(model, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, PROMPTS[0])
    with Engine(model, tiny_tokenizer, EngineSettings(max_batch=1, max_queue=1)) as engine:
        first, second = engine.submit(prompt, Sampling(max_new_tokens=400)) + \
            engine.submit(prompt, Sampling(max_new_tokens=400))
        with pytest.raises(QueueFull):
            engine.submit(prompt, Sampling(max_new_tokens=4))
        with pytest.raises(QueueFull):  # n requests come in together or not at all
            engine.submit(prompt, Sampling(max_new_tokens=4), n=2)
        next(iter(first))
        first.cancel()
        assert first.finish_reason == "cancelled" and engine.status()["generating"] == 1  # the second took its place
        second.cancel()
        assert engine.status()["generating"] == 0 and engine.status()["ended"] == {"cancelled": 2}
        assert engine.submit(prompt, Sampling(max_new_tokens=4))[0].wait().completion_tokens == 4


@pytest.mark.slow
def test_a_failing_batch_fails_its_requests_and_the_engine_recovers(model, tiny_tokenizer):
    with Engine(model, tiny_tokenizer, EngineSettings(max_batch=4)) as engine:
        broken = engine.submit([engine.vocab_size + 7], Sampling(max_new_tokens=4))[0]  # no such token: it fails
        with pytest.raises(EngineError):
            broken.wait()
        prompt = encode(tiny_tokenizer, PROMPTS[0])
        assert engine.submit(prompt, Sampling(max_new_tokens=6))[0].wait().token_ids == \
            greedy_reference(model, tiny_tokenizer, prompt, 6)
        assert engine.status()["ended"]["failed"] == 1


def test_an_empty_prompt_starts_from_the_start_token(engine, tiny_tokenizer):
    request = engine.submit([], Sampling(max_new_tokens=3))[0].wait()
    assert request.prompt_ids == [tiny_tokenizer.bos_token_id] and request.completion_tokens == 3


def test_what_batching_does_not_do_runs_alone_and_says_so(engine, model, tiny_tokenizer, capsys):
    prompt = encode(tiny_tokenizer, PROMPTS[2])
    ids = torch.tensor([prompt])
    beam = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=False, max_new_tokens=12,
                          early_stopping=True, pad_token_id=tiny_tokenizer.pad_token_id,
                          eos_token_id=tiny_tokenizer.eos_token_id)[0, len(prompt):].tolist()
    request = engine.submit(prompt, Sampling(max_new_tokens=12, num_beams=3))[0].wait()
    penalised = engine.submit(prompt, Sampling(max_new_tokens=12, repetition_penalty=1.3))[0].wait()
    top_k = engine.submit(prompt, Sampling(max_new_tokens=12, temperature=0.8, top_k=5))[0].wait()
    log = capsys.readouterr().err
    assert request.token_ids == beam and "beam search is not continuously batched" in log
    assert penalised.completion_tokens == top_k.completion_tokens == 12
    assert "repetition_penalty is not continuously batched" in log and "top_k is not" in log


def test_batching_off_generates_one_at_a_time_with_the_same_answers(model, tiny_tokenizer):
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS[:2]]
    with Engine(model, tiny_tokenizer, EngineSettings(batching="off")) as engine:
        assert engine.description.startswith("one request at a time (batching=off)")
        requests = [engine.submit(p, Sampling(max_new_tokens=10))[0] for p in prompts]
        assert [r.wait().token_ids for r in requests] == [greedy_reference(model, tiny_tokenizer, p, 10)
                                                          for p in prompts]


def test_starting_an_engine_leaves_the_random_generator_alone(model, tiny_tokenizer):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with Engine(model, tiny_tokenizer):  # continuous batching seeds the generator when it starts
        assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_a_batch_job_and_training_mode(model, tiny_tokenizer):
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS * 3]
    model.train()
    texts = generate_texts(model, tiny_tokenizer, prompts, Sampling(max_new_tokens=8), max_batch=3)
    assert model.training  # as it was
    model.eval()
    expected = [tiny_tokenizer.decode(greedy_reference(model, tiny_tokenizer, p, 8), skip_special_tokens=True).strip()
                for p in prompts]
    assert texts == expected


def test_log_probabilities_are_those_of_a_forward_pass(engine, model, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, PROMPTS[3])
    request = engine.submit(prompt, Sampling(max_new_tokens=10, temperature=1.0))[0].wait()
    scorer = engine.scorer(prompt, top=5)
    scored = scorer.score(request.token_ids[:4]) + scorer.score(request.token_ids[4:])  # in two parts, as streamed
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + request.token_ids])).logits[0].float(), dim=-1)
    for position, entry in enumerate(scored):
        row = logprobs[len(prompt) - 1 + position]
        assert entry.token_id == request.token_ids[position]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(5).indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)


@pytest.mark.slow
def test_a_4bit_base_with_its_adapter_is_batched_too(fact_adapters, fact):
    loaded = load_for_inference(inference_settings(adapter=str(fact_adapters[4]), device="cpu"))
    engine = loaded.start_engine(EngineSettings(max_batch=2))
    try:
        assert engine.description.startswith("continuous batching")
        prompt = loaded.encode(loaded.prompt(fact["instruction"]))
        answers = engine.submit(prompt, Sampling(max_new_tokens=20), n=2)
        assert [a.wait().text for a in answers] == [fact["output"]] * 2
    finally:
        engine.close()


def test_the_engine_is_started_explicitly_and_settings_are_never_ignored(tiny_model_dir):
    loaded = load_for_inference(inference_settings(model=str(tiny_model_dir), device="cpu"))
    with pytest.raises(RuntimeError, match="start_engine"):
        loaded.engine()  # nothing started it
    engine = loaded.start_engine(EngineSettings(max_batch=2, batching="off"))
    try:
        assert loaded.engine() is engine and loaded.engine(EngineSettings(max_batch=2, batching="off")) is engine
        with pytest.raises(RuntimeError, match="already running"):
            loaded.start_engine(EngineSettings(max_batch=3, batching="off"))
        with pytest.raises(RuntimeError, match="other settings"):  # not silently the first call's
            loaded.engine(EngineSettings(max_batch=3, batching="off"))
    finally:
        engine.close()
    assert loaded.start_engine(EngineSettings(max_batch=3, batching="off")).settings.max_batch == 3
    loaded.engine().close()


@pytest.mark.slow
def test_a_seed_gives_the_same_tokens_alone_or_batched_with_others(model, tiny_tokenizer):
    """Each seeded request draws from its own generator (keyed by its seed and the position of the token), so
    neither its neighbours in the batch nor the batch's switch from greedy to sampling change its tokens."""
    prompt = encode(tiny_tokenizer, PROMPTS[1])
    seeded = Sampling(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=42)
    with Engine(model, tiny_tokenizer, EngineSettings(max_batch=8)) as engine:
        alone = engine.submit(prompt, seeded)[0].wait().token_ids
        others = [r for p in PROMPTS for r in engine.submit(encode(tiny_tokenizer, p),
                                                             Sampling(max_new_tokens=30, temperature=1.3))]
        batched = engine.submit(prompt, seeded)[0]
        assert batched.wait().token_ids == alone and not all(r.done for r in others)  # they were generating
        assert engine.submit(prompt, replace(seeded, seed=43))[0].wait().token_ids != alone
        choices = [r.wait().token_ids for r in engine.submit(prompt, seeded, n=3)]
        assert choices[0] == alone and len({tuple(c) for c in choices}) == 3  # n choices, each its own seed
        assert [r.wait().token_ids for r in engine.submit(prompt, seeded, n=3)] == choices
        top_k = replace(seeded, top_k=20, seed=5)  # generated alone (model.generate), seeded the same way
        assert engine.submit(prompt, top_k)[0].wait().token_ids == engine.submit(prompt, top_k)[0].wait().token_ids


@pytest.mark.slow
def test_a_prompt_longer_than_the_cache_fails_alone_and_the_others_go_on(model, tiny_tokenizer):
    """Refused at once with a clear error of its own (never admitted to the batch, where it could only stall it
    and then fail every request in it); one that fits but leaves less room than max_new_tokens is answered as far
    as the context allows."""
    prompt = encode(tiny_tokenizer, PROMPTS[1])
    too_long = encode(tiny_tokenizer, "the quick brown fox jumps over the lazy dog " * 200)
    with Engine(model, tiny_tokenizer, EngineSettings(max_batch=2, cache_tokens=1024)) as engine:
        assert engine.context_length == 512 and len(too_long) > 1024
        running = engine.submit(prompt, Sampling(max_new_tokens=40))[0]
        with pytest.raises(PromptTooLong, match="longer than the model's context of 512"):
            engine.submit(too_long, Sampling(max_new_tokens=4))
        assert running.wait().token_ids == greedy_reference(model, tiny_tokenizer, prompt, 40)
        near_the_end = too_long[:500]
        assert engine.submit(near_the_end, Sampling(max_new_tokens=40))[0].wait().completion_tokens == 12
        done = dict(engine.generate_many([prompt, too_long, prompt], Sampling(max_new_tokens=8), raise_errors=False))
        assert done[0].token_ids == done[2].token_ids == greedy_reference(model, tiny_tokenizer, prompt, 8)
        assert "longer than the model's context" in done[1].error and done[1].token_ids == []
        with pytest.raises(PromptTooLong):  # a batch job that did not ask for failures raises
            list(engine.generate_many([too_long], Sampling(max_new_tokens=8)))


@pytest.mark.slow
def test_ignore_eos_and_min_tokens_in_every_path(fact_adapters, fact):
    """The fact's answer ends at EOS after a few tokens: ignore_eos goes on to max_new_tokens, min_tokens holds
    EOS off that long, whether the batch is greedy, samples, or the request is generated alone (top_k)."""
    loaded = load_for_inference(inference_settings(adapter=str(fact_adapters[16]), device="cpu"))
    prompt = loaded.encode(loaded.prompt(fact["instruction"]))
    with loaded.start_engine(EngineSettings(max_batch=2)) as engine:
        for path in [dict(), dict(temperature=1e-3, seed=1), dict(temperature=1.0, top_k=1)]:  # batch, alone
            plain = engine.submit(prompt, Sampling(max_new_tokens=20, **path))[0].wait()
            assert plain.text == "Quibbletown." and plain.finish_reason == "stop" and plain.completion_tokens < 10
            ignored = engine.submit(prompt, Sampling(max_new_tokens=20, ignore_eos=True, **path))[0].wait()
            assert ignored.finish_reason == "length" and ignored.completion_tokens == 20
            assert ignored.token_ids[:plain.completion_tokens] == plain.token_ids
            at_least = engine.submit(prompt, Sampling(max_new_tokens=20, min_tokens=12, **path))[0].wait()
            assert at_least.completion_tokens >= 12 and at_least.text.startswith("Quibbletown.")
            assert plain.token_ids[-1] not in at_least.token_ids[:12]  # no EOS among the first 12
