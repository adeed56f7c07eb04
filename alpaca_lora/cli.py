"""The ``alpaca-lora`` command: one subcommand per stage of the pipeline, each with ``--help``.

Every ``alpaca-lora STAGE ...`` is the same as ``python -m alpaca_lora.STAGE ...`` (the form cluster
scripts use); this module only dispatches.
"""

from __future__ import annotations

import importlib
import sys

# name: (module whose main(argv) runs it, what it is for); in pipeline order. The module, less a trailing
# ``.__main__``, is the stage's ``python -m`` form.
COMMANDS = {
    "data": ("alpaca_lora.data.self_instruct.__main__",
             "build instruction data with any OpenAI-compatible model: generate | regenerate | clean"),
    "recipes": ("alpaca_lora.cli", "list the shipped training recipes and what each is for"),
    "plan": ("alpaca_lora.plan", "will it fit? peak GPU memory of a recipe, before any weights load"),
    "train": ("alpaca_lora.train.__main__",
              "fine-tune a base model with a recipe (QLoRA, LoRA, full fine-tune with FSDP)"),
    "merge": ("alpaca_lora.merge", "merge a LoRA adapter into its base, verified"),
    "generate": ("alpaca_lora.generate", "answer an instruction, chat in the terminal, or answer a whole file"),
    "app": ("alpaca_lora.app.__main__", "a Gradio page to try a model in the browser (and vote on its answers)"),
    "serve": ("alpaca_lora.serve.__main__", "an OpenAI-compatible API server"),
    "evaluate": ("alpaca_lora.evaluate.__main__",
                 "answer an evaluation set; judge two answer files pairwise (an LLM judge or the references)"),
    "arena": ("alpaca_lora.arena.__main__", "blind pairwise votes by people in the browser; arena report"),
    "feedback": ("alpaca_lora.feedback.__main__",
                 "the app's and the arena's votes as preference data for DPO and KTO: feedback export"),
    "export": ("alpaca_lora.export", "a GGUF file for llama.cpp and Ollama, prompted as trained"),
}
DATA_MODES = ("generate", "regenerate", "clean")


def usage() -> str:
    lines = ["usage: alpaca-lora COMMAND [key=value ...]   (alpaca-lora COMMAND --help lists its keys)", "",
             "commands:"]
    lines += [f"  {name:<10} {purpose}" for name, (_, purpose) in COMMANDS.items()]
    return "\n".join(lines)


def recipes(argv: list[str]) -> int:
    """``alpaca-lora recipes``: each shipped recipe with its purpose, and where the files are."""
    from alpaca_lora.train.config import RECIPES_DIR, recipe_layers, recipe_names

    if {"-h", "--help"} & set(argv):
        print("usage: alpaca-lora recipes\nLists the shipped recipes; train with alpaca-lora train recipe=NAME, "
              "or recipe=path/to/yours.yaml (it may start with 'extends: NAME').")
        return 0
    for name in recipe_names():
        description = next((str(layer.values.get("description")) for layer in reversed(recipe_layers(name))
                            if layer.values.get("description")), "")
        print(f"  {name:<15} {description}")
    print(f"\nfiles: {RECIPES_DIR} (Slurm script: {RECIPES_DIR / 'slurm' / 'full_fsdp.sbatch'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"alpaca-lora {version('alpaca-lora')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "recipes":
        return recipes(rest)
    if name == "data" and rest and rest[0] in DATA_MODES:
        rest = [f"mode={rest[0]}", *rest[1:]]
    result = importlib.import_module(COMMANDS[name][0]).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
