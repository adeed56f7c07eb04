"""Every command in the README's code blocks is exercised, so the README cannot drift from the code.

In a workspace where ``outputs/demo`` is a real adapter (trained on the tests' tiny model) and
``outputs/demo-merged`` its merged model, in the README's order:

- run for real: ``--help`` of any command, ``recipes``, ``plan``, training as a dry run (GPU recipes with
  ``device=cuda``), ``merge`` and ``generate`` (one instruction, and the interactive prompt ended at once), and the
  Python snippets: the ``openai`` client against the README's ``serve`` command running, ``gradio_client``
  against its ``app`` command running;
- validated: every other ``alpaca-lora`` command (``app``, ``serve``, ``export``, ``data``, ``evaluate``,
  ``arena``, ``generate input_file=``) is parsed and checked by its stage's own loader, so a renamed or removed
  key fails here;
- other programs: ``make`` targets exist (``make -n``), the Slurm script is valid bash, benchmark scripts answer
  ``--help``, diagnostics (``python -c ...``, ``python -m bitsandbytes``) run; Ollama, llama.cpp, vLLM and
  ``transformers serve`` are not checked here (not installed; the export tests check what they read);
- every link to a section (``[...](#anchor)``) names a heading that exists, as GitHub spells its anchor.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alpaca_lora import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")
# Programs the README shows that these tests cannot run, and why.
NOT_CHECKED = {
    "ollama": "Ollama is not installable from a package registry here (its TEMPLATE is checked in test_templates)",
    "llama-cli": "llama.cpp's binaries are not built here (make test-llamacpp checks the GGUF with llama.cpp)",
    "llama-server": "llama.cpp's binaries are not built here (make test-llamacpp checks the GGUF with llama.cpp)",
    "vllm": "vLLM needs a GPU and is not installed",
    "transformers": "transformers serve is run against our server in tests/test_export.py",
}
STAGE_MODULES = {module.removesuffix(".__main__"): name for name, (module, _) in cli.COMMANDS.items()}


@dataclass
class Command:
    line: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"README line {self.line}: {shlex.join(self.argv)}"


def code_blocks(languages: tuple[str, ...]) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, textwrap.dedent(m["body"])) for m in FENCE.finditer(text)
            if m["lang"] in languages]


def shell_commands() -> list[Command]:
    """The README's shell lines as commands: continuations joined, comments dropped, ``VAR=value`` prefixes and
    ``export``s kept as the environment of the commands after them in the block."""
    commands = []
    for first_line, body in code_blocks(SHELL):
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
            commands.append(Command(first_line + offset, words, {**env, **prefix}))
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


COMMANDS = shell_commands()


@pytest.fixture(scope="module")
def workspace(fact_adapters, tmp_path_factory) -> Path:
    """``outputs/demo``: a 4-bit (QLoRA) adapter of the tiny model; ``outputs/demo-merged``: its merge."""
    from alpaca_lora.merge import main as merge

    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(fact_adapters[4], root / "outputs" / "demo")
    assert merge([f"adapter={root / 'outputs/demo'}", f"output={root / 'outputs/demo-merged'}",
                  "dequantize=true"]) == 0
    return root


@pytest.fixture
def in_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # an interactive prompt ends at once (EOF)
    return workspace


def alpaca_lora(argv: list[str]) -> int:
    """``alpaca-lora ARGV`` in this process (the console script calls the same function)."""
    try:
        return cli.main(argv)
    except SystemExit as exc:  # a user error: entry points print `error: ...` and exit 2
        return exc.code


def validators() -> dict:
    """Each stage's own settings loader: what its command runs before any work."""
    from alpaca_lora.app.page import load_app_config
    from alpaca_lora.data.self_instruct.settings import load_builder_config
    from alpaca_lora.export import load_export_config
    from alpaca_lora.generate import load_generate_config
    from alpaca_lora.merge import load_merge_config
    from alpaca_lora.serve.server import load_serve_config
    from alpaca_lora.train.config import load_config
    from alpaca_lora.train.plan import load_plan_config

    def data(args: list[str]):
        return load_builder_config([f"mode={args[0]}", *args[1:]] if args and args[0] in cli.DATA_MODES else args)

    def app(args: list[str]):
        from alpaca_lora.feedback.store import FeedbackStore

        cfg = load_app_config(args)
        if cfg.feedback_db:
            FeedbackStore(cfg.feedback_db)  # the app opens its votes database when it starts; feedback export reads it
        return cfg

    found = {"train": load_config, "plan": load_plan_config, "merge": load_merge_config, "export": load_export_config,
             "generate": load_generate_config, "app": app, "serve": load_serve_config, "data": data}
    if "evaluate" in cli.COMMANDS:
        from alpaca_lora.evaluate.__main__ import COMMANDS as EVALUATE

        found["evaluate"] = lambda args: EVALUATE[args[0]].load(args[1:])
    if "feedback" in cli.COMMANDS:
        from alpaca_lora.feedback.__main__ import COMMANDS as FEEDBACK

        found["feedback"] = lambda args: FEEDBACK[args[0]].load(args[1:])
    if "arena" in cli.COMMANDS:
        from alpaca_lora.arena.__main__ import COMMANDS as ARENA
        from alpaca_lora.arena.page import ArenaStore

        def arena(args: list[str]):
            if args[:1] == ["report"]:
                return ARENA["report"].load(args[1:])
            cfg = ARENA[""].load(args)
            ArenaStore(cfg.db)  # the arena opens its votes database when it starts; `arena report` after it reads it
            return cfg

        found["arena"] = arena
    return found


def on_this_machine(args: list[str]) -> list[str]:
    """A record of a run on another machine (``adapter=/its/path output=/its/file``): the same command with this
    workspace's adapter, writing into the workspace."""
    moved = {"adapter": lambda path: "outputs/demo", "output": lambda path: f"outputs/{Path(path).name}"}
    result = []
    for arg in args:
        name, _, value = arg.partition("=")
        result.append(f"{name}={moved[name](value)}" if name in moved and Path(value).is_absolute() else arg)
    return result


def check_alpaca_lora(command: Command, stage: str, args: list[str], monkeypatch) -> str:
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
    if stage == "train":
        recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), "qlora")
        gpu = [] if recipe == "demo" else ["device=cuda"]
        assert alpaca_lora(["train", *args, "dry_run=true", *gpu]) == 0, command
        return "run (dry run)"
    if stage == "merge":
        assert alpaca_lora(["merge", *args, "overwrite=true"]) == 0, command  # the workspace holds its output
        return "run"
    if stage == "generate" and not any(a.startswith("input_file=") for a in args):
        assert alpaca_lora(["generate", *args]) == 0, command
        return "run"
    validate = validators().get(stage)
    assert validate, f"{command}: no validation for '{stage}' commands in tests/test_readme.py"
    validate(on_this_machine(args))
    return "validated"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}-{'-'.join(c.argv[:3])}" for c in COMMANDS])
def test_readme_command(command, in_workspace, monkeypatch, capsys):
    stage = stage_and_arguments(command)
    if stage is not None:
        check_alpaca_lora(command, *stage, monkeypatch)
        return
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
    """The parser sees the README's commands (a broken fence or parser would make the tests above vacuous)."""
    stages = {stage_and_arguments(c)[0] for c in COMMANDS if stage_and_arguments(c)}
    assert {"--help", "recipes", "train", "plan", "merge", "generate", "app", "serve", "export", "data"} <= stages
    assert len(COMMANDS) >= 30


def snippet(marker: str) -> str:
    found = [body for _, body in code_blocks(("python",)) if marker in body]
    assert len(found) == 1, f"one README Python snippet with {marker!r}"
    return found[0]


def test_every_python_snippet_is_checked():
    known = ("from openai import OpenAI", "from gradio_client import Client")
    unchecked = [body for _, body in code_blocks(("python",)) if not any(marker in body for marker in known)]
    assert unchecked == [], "a README Python snippet no test runs"


def test_the_openai_snippet_against_the_readme_server(in_workspace, serving):
    """The README's ``alpaca-lora serve model=outputs/demo-merged`` started, its openai snippet run against it."""
    from alpaca_lora.serve.server import ServeConfig, load_serve_config

    code = snippet("from openai import OpenAI")
    default = f"http://127.0.0.1:{ServeConfig.port}/v1"
    assert default in code, "the snippet talks to the server's default address"
    serve = next(c for c in COMMANDS if c.argv[:3] == ["alpaca-lora", "serve", "model=outputs/demo-merged"])
    scope: dict = {}
    for url in serving(load_serve_config(serve.argv[2:])):
        exec(compile(code.replace(default, url), "README.md", "exec"), scope)
    assert scope["reply"].choices[0].finish_reason in ("stop", "length") and scope["reply"].usage.prompt_tokens > 0


def test_the_gradio_client_snippet_against_the_readme_app(in_workspace):
    """The README's ``alpaca-lora app adapter=outputs/demo`` launched, its gradio_client snippet run against it."""
    import socket

    from alpaca_lora.app.page import AppConfig, build_page, launch_kwargs, load_app_config
    from alpaca_lora.inference.loading import load_for_inference

    code = snippet("from gradio_client import Client")
    default = f"http://127.0.0.1:{AppConfig.port}/"
    assert default in code, "the snippet talks to the app's default address"
    app = next(c for c in COMMANDS if c.argv[:3] == ["alpaca-lora", "app", "adapter=outputs/demo"])
    cfg = load_app_config(app.argv[2:])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = build_page(load_for_inference(cfg), cfg)
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs())
    try:
        scope: dict = {}
        exec(compile(code.replace(default, f"http://127.0.0.1:{port}/"), "README.md", "exec"), scope)
        assert isinstance(scope["answer"], str) and "What is the capital of France?" in scope["prompt"]
    finally:
        page.close()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_section_link_resolves():
    """A renamed heading would otherwise leave its links pointing nowhere, with no error anywhere."""
    text = FENCE.sub("", README.read_text())  # a '#' line inside a code block is not a heading
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        anchor = github_anchor(heading)
        anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)  # repeats get -1, -2, ...
        seen[anchor] = seen.get(anchor, 0) + 1
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links, "the README links to its sections"
    assert sorted(set(links) - anchors) == [], "links to sections that do not exist"
