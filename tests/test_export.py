"""GGUF export, checked by the real consumers: the gguf package's reader, transformers' GGUF loader and
(opt-in, ``make test-llamacpp``) llama.cpp itself; an Ollama Modelfile beside it; one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from alpaca_lora.data.examples import encode_prompt
from alpaca_lora.data.templates import chat_template, get_template, ollama_template
from alpaca_lora.export import fetch_sdist, main
from alpaca_lora.model import load_tokenizer

# f16 rounds every weight once: the GGUF's logits may differ from the float32 model's by this much,
# relative to the largest |logit| (measured: about 1e-3 for the tiny random Llama and the demo model).
F16_RELATIVE_TOLERANCE = 1e-2
PROMPTS = [("Give three tips for staying healthy.", ""), ("Translate the sentence into French.", "Good morning!")]


@pytest.fixture(scope="session")
def demo_adapter(demo_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the demo model with random (non-zero) weights: merging it must change the model."""
    from peft import LoraConfig, get_peft_model

    directory = tmp_path_factory.mktemp("demo-adapter")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(directory)
    load_tokenizer(str(demo_model_dir)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def merged_demo(demo_adapter, tmp_path_factory) -> Path:
    from alpaca_lora.merge import main as merge

    output = tmp_path_factory.mktemp("merged-demo") / "merged"
    assert merge([f"adapter={demo_adapter}", f"output={output}"]) == 0
    return output


def field(reader: GGUFReader, name: str):
    found = reader.get_field(name)
    return found.contents() if found is not None else None


def prompt_ids(tokenizer, template) -> list[torch.Tensor]:
    return [torch.tensor([encode_prompt(tokenizer, template.format(*p))]) for p in PROMPTS]


@torch.no_grad()
def compare(reference, exported, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Asserts identical greedy tokens; returns the largest relative difference of the last-position logits."""
    worst = 0.0
    for ids in prompts:
        want = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        got = exported.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert got.tolist() == want.tolist()
        logits, gguf_logits = reference(ids).logits[0, -1], exported(ids).logits[0, -1]
        worst = max(worst, ((gguf_logits - logits).abs().max() / logits.abs().max()).item())
    return worst


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_the_trained_adapter_and_the_merged_model_carry_the_training_template(fact_adapters, tmp_path):
    from alpaca_lora.merge import main as merge

    expected = chat_template(get_template("alpaca"), bos=True)  # the tiny tokenizer adds BOS itself
    assert (fact_adapters[16] / "chat_template.jinja").read_text() == expected
    assert merge([f"adapter={fact_adapters[16]}", f"output={tmp_path / 'merged'}"]) == 0
    tokenizer = load_tokenizer(str(tmp_path / "merged"))
    assert tokenizer.chat_template == expected
    messages = [{"role": "user", "content": "What is the capital of Zorblax?"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
        encode_prompt(tokenizer, get_template("alpaca").format("What is the capital of Zorblax?"))


@pytest.mark.slow
def test_a_tiny_llama_reads_back_through_gguf_and_transformers(smol_llama_dir, llama_cpp, tmp_path, capsys):
    output = tmp_path / "out" / "smol.gguf"
    assert main(["format=gguf", f"model={smol_llama_dir}", f"output={output}", "template=alpaca_lora",
                 f"llama_cpp={llama_cpp}"]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create smol -f {output.with_suffix('.Modelfile')}" in printed
    assert f"llama-cli -m {output}" in printed
    assert sorted(p.name for p in output.parent.iterdir()) == ["smol.Modelfile", "smol.gguf"]  # no leftovers

    reader = GGUFReader(output)
    with safe_open(smol_llama_dir / "model.safetensors", "pt") as weights:
        assert len(reader.tensors) == len(list(weights.keys())) == 21
    tokenizer = load_tokenizer(str(smol_llama_dir))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.chat_template") == chat_template(get_template("alpaca_lora"), bos=False)
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id == 2
    assert field(reader, "tokenizer.ggml.pre") == "smollm"

    reference = AutoModelForCausalLM.from_pretrained(smol_llama_dir, dtype=torch.float32).eval()
    assert compare(reference, load_gguf(output), prompt_ids(tokenizer, get_template("alpaca_lora")), 8) \
        <= F16_RELATIVE_TOLERANCE

    modelfile = output.with_suffix(".Modelfile").read_text()
    assert "\nFROM ./smol.gguf\n" in modelfile
    assert f'TEMPLATE """{ollama_template(get_template("alpaca_lora"))}"""' in modelfile
    assert modelfile.endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "### Instruction:"\n')


@pytest.mark.slow
def test_the_demo_adapter_is_merged_and_converted_like_the_merged_model(demo_adapter, merged_demo, llama_cpp,
                                                                        tmp_path):
    output = tmp_path / "demo.gguf"
    assert main(["format=gguf", f"adapter={demo_adapter}", f"output={output}", f"llama_cpp={llama_cpp}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.Modelfile", "demo.gguf"]  # the merge is gone too

    reader = GGUFReader(output)
    merged_tokenizer = load_tokenizer(str(merged_demo))
    assert (merged_demo / "chat_template.jinja").read_text() == merged_tokenizer.chat_template  # merge carries it
    assert field(reader, "general.architecture") == "llama"
    assert len(reader.tensors) == 272  # 30 layers x 9, the embedding (tied to the head) and the final norm
    assert field(reader, "tokenizer.chat_template") == merged_tokenizer.chat_template == \
        chat_template(get_template("alpaca"), bos=False)
    assert field(reader, "tokenizer.ggml.eos_token_id") == merged_tokenizer.eos_token_id == 2  # <|im_end|>

    merged = AutoModelForCausalLM.from_pretrained(merged_demo, dtype=torch.float32).eval()
    assert compare(merged, load_gguf(output), prompt_ids(merged_tokenizer, get_template("alpaca")), 16) \
        <= F16_RELATIVE_TOLERANCE


@pytest.mark.slow
def test_an_existing_output_is_refused_before_any_work_unless_overwrite(smol_llama_dir, llama_cpp, tmp_path,
                                                                       capsys):
    output = tmp_path / "smol.gguf"
    output.write_text("mine")
    args = ["format=gguf", f"model={smol_llama_dir}", f"output={output}", f"llama_cpp={llama_cpp}"]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"error: key 'output': {output} exists; choose another file or set "
                                       "overwrite=true\n")
    assert main(args + ["overwrite=true"]) == 0
    assert GGUFReader(output).get_field("general.architecture").contents() == "llama"


@pytest.mark.slow
def test_relative_paths_work_from_the_users_working_directory(demo_adapter, llama_cpp, tmp_path, monkeypatch):
    """The documented command, ``export format=gguf adapter=outputs/demo output=outputs/demo.gguf``, run from the
    directory holding outputs/: the converter runs in its own working directory, so it must be handed absolute
    paths (it failed: ``outputs/.demo.gguf.partial-.../vocab is not a directory``)."""
    shutil.copytree(demo_adapter, tmp_path / "outputs" / "demo")
    (tmp_path / "llama.cpp").symlink_to(llama_cpp)
    monkeypatch.chdir(tmp_path)
    assert main(["format=gguf", "adapter=outputs/demo", "output=outputs/demo.gguf", "llama_cpp=llama.cpp"]) == 0
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["demo", "demo.Modelfile", "demo.gguf"]
    assert field(GGUFReader(tmp_path / "outputs" / "demo.gguf"), "general.architecture") == "llama"


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_an_output_that_is_a_folder_or_cannot_be_written_is_refused_before_any_work(smol_llama_dir, llama_cpp,
                                                                                     read_only_dir, tmp_path, capsys):
    """Both failed after the whole conversion: IsADirectoryError, PermissionError."""
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    args = ["format=gguf", f"model={smol_llama_dir}", f"llama_cpp={llama_cpp}", "overwrite=true"]
    assert _error([*args, f"output={folder}"], capsys) == \
        f"error: key 'output': {folder} is a directory; name the file to write"
    err = _error([*args, f"output={read_only_dir / 'x.gguf'}"], capsys)
    assert err.startswith(f"error: key 'output': cannot write in {read_only_dir} (")
    assert list(read_only_dir.iterdir()) == [] and list(folder.iterdir()) == []


@pytest.mark.slow
def test_a_tokenizer_llama_cpp_does_not_know_is_a_one_line_error_and_nothing_is_written(tiny_model_dir, llama_cpp,
                                                                                       tmp_path, capsys):
    err = _error(["format=gguf", f"model={tiny_model_dir}", f"output={tmp_path / 'tiny.gguf'}",
                  f"llama_cpp={llama_cpp}"], capsys)
    assert "does not recognise this tokenizer's pre-tokenizer" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_architecture_llama_cpp_does_not_know_is_a_one_line_error(smol_llama_dir, llama_cpp, tmp_path, capsys):
    model = tmp_path / "strange"
    shutil.copytree(smol_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["StrangeForCausalLM"]}))
    err = _error(["format=gguf", f"model={model}", f"output={tmp_path / 'x.gguf'}", f"llama_cpp={llama_cpp}"], capsys)
    assert err == "error: llama.cpp's converter does not support the architecture StrangeForCausalLM"


def test_no_converter_and_a_failing_converter_are_one_line_errors(smol_llama_dir, tmp_path, capsys):
    args = ["format=gguf", f"model={smol_llama_dir}", f"output={tmp_path / 'x.gguf'}"]
    err = _error(args + [f"llama_cpp={tmp_path}"], capsys)
    assert err == f"error: key 'llama_cpp': {tmp_path} has no convert_hf_to_gguf.py and gguf-py/ (a llama.cpp checkout)"
    broken = tmp_path / "llama.cpp"
    (broken / "gguf-py").mkdir(parents=True)
    (broken / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('INFO: loading')\nprint('Traceback (most recent call last):')\n"
        "print('KeyError: rope_theta')\nsys.exit(1)\n")
    err = _error(args + [f"llama_cpp={broken}"], capsys)
    assert err == "error: llama.cpp's converter failed: KeyError: rope_theta"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp"]


@pytest.mark.slow
def test_not_enough_disk_is_refused_before_the_merge(demo_adapter, llama_cpp, tmp_path, capsys, monkeypatch):
    import alpaca_lora.export

    monkeypatch.setattr(alpaca_lora.export.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**8))
    err = _error(["format=gguf", f"adapter={demo_adapter}", f"output={tmp_path / 'demo.gguf'}",
                  f"llama_cpp={llama_cpp}"], capsys)
    assert err.startswith(f"error: not enough disk space in {tmp_path}: the export needs about ")
    assert err.endswith(" GB (merged model and GGUF), 0.1 GB are free")
    assert list(tmp_path.iterdir()) == []


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a primary colour."}],
]


@pytest.mark.slow
def test_transformers_serve_answers_like_this_projects_server(merged_demo, tmp_path, serving, free_port):
    """`transformers serve` applies the merged model's chat template: the training template travelled."""
    import httpx
    import openai

    from alpaca_lora.inference.loading import inference_settings
    from alpaca_lora.serve.server import ServeConfig

    command = Path(sys.executable).with_name("transformers")
    if not command.is_file():
        pytest.skip(f"{command} (transformers' command line) is not installed")
    ours = serving(inference_settings(ServeConfig, model=str(merged_demo), device="cpu", served_model_name="merged"))
    client = openai.OpenAI(api_key="none", base_url=next(ours), max_retries=0)
    port = free_port()
    log = (tmp_path / "transformers-serve.log").open("w")
    process = subprocess.Popen([str(command), "serve", str(merged_demo), "--host", "127.0.0.1", "--port", str(port),
                                "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT)
    try:
        theirs = openai.OpenAI(api_key="none", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=300)
        for _ in range(1200):  # until it listens (model loading takes a while on a busy CPU)
            assert process.poll() is None, (tmp_path / "transformers-serve.log").read_text()[-2000:]
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        for messages in CHATS:
            want = client.chat.completions.create(model="merged", messages=messages, temperature=0, max_tokens=24)
            got = theirs.chat.completions.create(model=str(merged_demo), messages=messages, temperature=0,
                                                 max_tokens=24)
            assert got.usage.prompt_tokens == want.usage.prompt_tokens  # the same prompt, token for token
            assert got.usage.completion_tokens == want.usage.completion_tokens
            # this project's server strips the whitespace around a chat answer; transformers keeps it
            assert got.choices[0].message.content.strip() == want.choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        next(ours, None)  # stops this project's server


# --- opt-in: llama.cpp itself (make test-llamacpp) -----------------------------------------------

needs_llama_cpp = pytest.mark.skipif(os.environ.get("ALPACA_LORA_LLAMACPP") != "1",
                                     reason="builds llama.cpp (tens of minutes): run `make test-llamacpp`")


@pytest.fixture(scope="session")
def llama_cpp_python(llama_cpp):
    """llama-cpp-python built once from the converter's own sources (the wheel is cached) and installed here."""
    from alpaca_lora.export import CONVERTER_VERSION

    try:
        import llama_cpp as module

        if module.__version__ == CONVERTER_VERSION:
            return module
    except ImportError:
        pass
    wheels = llama_cpp.parents[2] / "wheels"  # beside the sources, in the cache
    if not list(wheels.glob(f"llama_cpp_python-{CONVERTER_VERSION}-*.whl")):
        print(f"\nbuilding llama-cpp-python {CONVERTER_VERSION} (compiles llama.cpp, once) into {wheels}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(fetch_sdist())],
                       check=True)
    wheel = next(wheels.glob(f"llama_cpp_python-{CONVERTER_VERSION}-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(wheel)], check=True)  # + diskcache
    import llama_cpp as module

    return module


@needs_llama_cpp
def test_llama_cpp_generates_the_same_greedy_tokens_as_transformers(llama_cpp_python, merged_demo, llama_cpp,
                                                                   tmp_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    output = tmp_path / "demo.gguf"
    assert main(["format=gguf", f"model={merged_demo}", f"output={output}", f"llama_cpp={llama_cpp}"]) == 0
    tokenizer, template = load_tokenizer(str(merged_demo)), get_template("alpaca")
    llm = llama_cpp_python.Llama(model_path=str(output), n_ctx=512, n_threads=2, verbose=False)
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                    bos_token="<|im_start|>")
    exported = load_gguf(output)
    compared = 0
    for instruction, text in PROMPTS + [("What is the capital of France?", ""), ("Add 17 and 25.", "")]:
        prompt = template.format(instruction, text)
        messages = [{"role": "system", "content": text}] if text else []
        rendered = formatter(messages=messages + [{"role": "user", "content": instruction}]).prompt
        assert rendered == prompt  # the GGUF's chat template, rendered by llama-cpp-python
        ids = encode_prompt(tokenizer, prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # the GGUF's tokenizer
        want = exported.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        want = want[: want.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in want else want
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == tokenizer.eos_token_id or len(got) == len(want):
                break
            got.append(token)
        assert got == want
        compared += len(got)
    print(f"\nllama.cpp {llama_cpp_python.__version__}: {compared} greedy tokens over 4 prompts, all equal to "
          f"transformers' on {output.name}")


@pytest.mark.slow
def test_a_model_trained_on_conversations_answers_with_its_history_through_the_gguf(
        smol_llama_dir, llama_cpp, tmp_path, go_templates, train_on_conversations, two_turn_facts):
    """Trained on a messages file, exported: the GGUF's chat template and the Modelfile's TEMPLATE render a chat's
    history in turns exactly as training and the server do, and the GGUF model answers the history-dependent
    second question."""
    from transformers import AutoTokenizer

    from alpaca_lora.data.templates import Prompter

    adapter = train_on_conversations(smol_llama_dir, tmp_path)
    output = tmp_path / "chat.gguf"
    assert main(["format=gguf", f"adapter={adapter}", f"output={output}", f"llama_cpp={llama_cpp}"]) == 0
    reader = GGUFReader(output)
    in_turns = chat_template(get_template("alpaca"), bos=False, multi_turn=True)
    assert field(reader, "tokenizer.chat_template") == in_turns
    modelfile = output.with_suffix(".Modelfile").read_text()
    ollama = ollama_template(get_template("alpaca"), multi_turn=True, eos_token="<|im_end|>")
    assert f'TEMPLATE """{ollama}"""' in modelfile

    prompter = Prompter(get_template("alpaca"), load_tokenizer(str(adapter)), multi_turn=True)  # as trained, served
    gguf_tokenizer = AutoTokenizer.from_pretrained(output.parent, gguf_file=output.name)
    histories = [[question, answer, follow_up] for question, answer, follow_up, _ in two_turn_facts]
    assert go_templates([(ollama, [{"Role": m["role"], "Content": m["content"]} for m in history])
                         for history in histories]) == [prompter.prompt(history) for history in histories]
    model = load_gguf(output)
    for history, (*_, second) in zip(histories, two_turn_facts):
        ids = gguf_tokenizer.apply_chat_template(history, add_generation_prompt=True, return_dict=False,
                                                 chat_template=field(reader, "tokenizer.chat_template"))
        assert ids == prompter.encode(prompter.prompt(history))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert gguf_tokenizer.decode(out[0, len(ids):]) == second["content"] + "<|im_end|>"
