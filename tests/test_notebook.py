"""The Colab walkthrough (notebooks/alpaca_lora_colab.ipynb), executed top to bottom in its smoke mode (CPU,
offline, the demo model, a few steps) with parameters injected as papermill injects them: a step that fails
fails the run, nothing the notebook starts outlives it, and its links point at the package's declared home."""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "alpaca_lora_colab.ipynb"
CELL_TIMEOUT = 900  # seconds for one cell: the smoke training on a busy 2-core machine
# The demo model's conversion and llama.cpp's converter are cached where `make demo` caches them (the per-test
# cache of conftest would convert and fetch them again for every run).
USER_CACHE = os.environ.get("ALPACA_LORA_CACHE")


def repository() -> str:
    """pyproject.toml's ``[project.urls] Repository`` (read as text: tomllib is not in Python 3.10)."""
    urls = (REPO / "pyproject.toml").read_text().split("[project.urls]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^Repository = "([^"]+)"', urls, re.M)[1]


def colab_url() -> str:
    return (f"https://colab.research.google.com/github/{repository().removeprefix('https://github.com/')}"
            f"/blob/main/notebooks/{NOTEBOOK.name}")


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def cell(nb: nbformat.NotebookNode, ident: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.get("id") == ident)



def with_parameters(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """A cell after the one tagged ``parameters`` that sets ``values``, as papermill injects them."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def execute(nb: nbformat.NotebookNode, work: Path, allow_errors: bool = False) -> float:
    """Runs ``nb`` in a fresh kernel with the working directory ``work``, in smoke mode; returns the seconds taken."""
    env = {**os.environ, "ALPACA_LORA_SMOKE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("OPENAI_API_KEY", None)  # the steps that need a key are skipped, visibly
    env.pop("ALPACA_LORA_CACHE", None)
    if USER_CACHE:
        env["ALPACA_LORA_CACHE"] = USER_CACHE
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT, allow_errors=allow_errors,
                            resources={"metadata": {"path": str(work)}})
    started = time.monotonic()
    client.execute(env=env)
    return time.monotonic() - started


def still_running(work: Path, ports: list[int]) -> list[str]:
    """Whatever a run left behind: a port that still answers, a process whose command line names its directory."""
    found = []
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                found.append(f"port {port} still answers")
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(work) in part for part in process.info["cmdline"] or []):
                found.append(f"process {process.info['pid']}: {' '.join(process.info['cmdline'])}")
        except psutil.Error:
            continue
    return found


def text_of(nb_cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in nb_cell.get("outputs", []) if out.output_type == "stream")


def images_of(nb_cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in nb_cell.get("outputs", []))


@dataclass
class SmokeRun:
    nb: nbformat.NotebookNode
    work: Path
    output_dir: Path
    ports: list[int]
    seconds: float


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, free_port) -> SmokeRun:
    work = tmp_path_factory.mktemp("notebook")
    ports = [free_port(), free_port()]
    output_dir = work / "outputs"
    nb = with_parameters(read_notebook(), OUTPUT_DIR=str(output_dir), SERVE_PORT=ports[0], APP_PORT=ports[1])
    seconds = execute(nb, work)
    print(f"\nthe notebook's smoke run took {seconds:.0f} s")
    return SmokeRun(nb, work, output_dir, ports, seconds)


def test_the_notebook_runs_top_to_bottom_in_smoke_mode(smoke_run):
    nb, out = smoke_run.nb, smoke_run.output_dir
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)  # every cell ran, none raised (nbclient would have)
    assert f"package: {REPO / 'alpaca_lora'}" in text_of(cell(nb, "install"))  # this checkout's code ran
    assert "skipped in smoke mode: pip install" in text_of(cell(nb, "install"))
    assert "skipped in smoke mode: the GPU check" in text_of(cell(nb, "gpu"))
    assert "fits in 14.8 GiB" in text_of(cell(nb, "plan"))
    assert "skipped: no OPENAI_API_KEY" in text_of(cell(nb, "self-instruct"))
    assert images_of(cell(nb, "data")) == 1 and images_of(cell(nb, "train")) == 1  # histogram, loss curve
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "merge_report.json").is_file()
    assert (out / "model.gguf").stat().st_size > 0 and (out / "model.Modelfile").is_file()
    assert images_of(cell(nb, "evaluate")) == 1 and (out / "evaluate" / "reference" / "report.json").is_file()
    assert "skipped: the LLM judge" in text_of(cell(nb, "evaluate"))
    assert text_of(cell(nb, "serve")).count(" -> ") == 2  # two answers through the openai client
    assert "the page answered" in text_of(cell(nb, "app"))
    assert "skipped in smoke mode: the feedback loop" in text_of(cell(nb, "feedback"))


def test_nothing_the_notebook_started_outlives_it(smoke_run):
    assert still_running(smoke_run.work, smoke_run.ports) == []


def test_a_failing_step_fails_the_run(tmp_path, free_port):
    """The training command broken (a key that does not exist): its cell fails, and the run stops there."""
    nb = with_parameters(read_notebook(), OUTPUT_DIR=str(tmp_path / "outputs"), SERVE_PORT=free_port(),
                         APP_PORT=free_port())
    train = cell(nb, "train")
    assert 'run("train", *TRAIN, "overwrite=true")' in train.source
    train.source = train.source.replace('"overwrite=true")', '"overwrite=true", "no_such_key=1")')
    with pytest.raises(CellExecutionError) as failure:
        execute(nb, tmp_path)
    assert "CalledProcessError" in str(failure.value) and "non-zero exit status 2" in str(failure.value)
    assert "unknown key 'no_such_key'" in text_of(train)  # the command's own error line, shown in the cell
    later = nb.cells[nb.cells.index(train) + 1:]
    assert [c.get("id") for c in later if c.cell_type == "code" and c.execution_count] == []
    assert still_running(tmp_path, []) == []


def test_a_failure_while_serving_stops_the_server(smoke_run, tmp_path, free_port):
    """The server is up and the request is broken (max_tokens=-1: a 400): the cell fails, and the server is
    already stopped when the next cell runs, not only when the kernel exits."""
    original = read_notebook()
    serve = cell(original, "serve")
    assert "max_tokens=MAX_NEW_TOKENS" in serve.source
    serve.source = serve.source.replace("max_tokens=MAX_NEW_TOKENS", "max_tokens=-1")
    probe = nbformat.v4.new_code_cell(
        "import socket\nwith socket.socket() as s:\n"
        "    print('server exited:', server.poll() is not None, '| port answers:',"
        " s.connect_ex(('127.0.0.1', SERVE_PORT)) == 0)")
    original.cells = [cell(original, "parameters"), cell(original, "helpers"), serve, probe]
    port = free_port()
    nb = with_parameters(original, OUTPUT_DIR=str(tmp_path / "outputs"), MERGED=str(smoke_run.output_dir / "merged"),
                         INSTRUCTIONS=[("Say hello.", "")], SERVE_PORT=port)
    execute(nb, tmp_path, allow_errors=True)
    errors = [out for out in serve.outputs if out.output_type == "error"]
    assert [e.ename for e in errors] == ["BadRequestError"]
    assert "server exited: True | port answers: False" in text_of(probe)
    assert still_running(tmp_path, [port]) == [] and still_running(smoke_run.output_dir / "merged", []) == []


def test_the_notebook_is_committed_clean():
    """No outputs; a parameters cell; no `!`/`%` lines (a failing `!command` does not fail a run)."""
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.get("id") for c in code if c.outputs or c.execution_count is not None] == []
    assert [c.get("id") for c in code if "parameters" in c.metadata.get("tags", [])] == ["parameters"]
    shell = [line for c in code for line in c.source.splitlines() if line.lstrip().startswith(("!", "%"))]
    assert shell == []


def test_the_colab_badges_and_the_install_point_at_the_declared_repository():
    nb = read_notebook()
    badge = re.compile(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
                       r"\((?P<url>[^)]+)\)")
    readme_badges = [m["url"] for m in badge.finditer((REPO / "README.md").read_text())]
    first = nb.cells[0]
    assert first.cell_type == "markdown" and (m := badge.match(first.source)) and m["url"] == colab_url()
    assert readme_badges and set(readme_badges) == {colab_url()}
    install = cell(nb, "install").source
    assert f'REPOSITORY = "{repository()}"' in install and '"alpaca-lora @ git+{REPOSITORY}"' in install


def test_the_t4_plan_and_training_command_are_valid(monkeypatch, tmp_path, capsys):
    """The normal mode's plan and training command (a T4: float16, its memory), as the notebook builds them: the plan
    fits, and the training command passes a dry run, so its keys and values are ones train takes."""
    from alpaca_lora.cli import main

    monkeypatch.delenv("ALPACA_LORA_SMOKE", raising=False)
    nb, calls = read_notebook(), []
    scope = {"run": lambda *args: calls.append([str(a) for a in args])}
    exec(cell(nb, "parameters").source, scope)
    scope.update(OUTPUT_DIR=str(tmp_path), COMPUTE_DTYPE="float16", GPU_MEMORY="14.75GiB")
    exec(cell(nb, "plan").source, scope)
    assert [args[0] for args in calls] == ["plan"] and "device=cuda" in scope["TRAIN"]
    assert main(calls[0]) == 0 and "fits in 14.8 GiB" in capsys.readouterr().out
    assert main(["train", *scope["TRAIN"], "dry_run=true"]) == 0
    assert "bnb_4bit_compute_dtype: float16" in capsys.readouterr().out  # the T4's dtype reaches bitsandbytes
