"""Fine-tuning, ``alpaca-lora train`` (``python -m alpaca_lora.train``): the configuration (``config``: schema,
recipes, validation) and what it becomes on this machine (``runtime``), the memory planner (``plan``), the run
itself (``run``: data, run plan, model, trainer, finish) and its parts: TRL's trainer with the LM head at trained
labels (``trainer``), the batch plan of packing (``packing``), sealed checkpoints and resume (``checkpoints``),
the process launcher (``launcher``), model shapes (``architectures``), the saved adapter's check (``adapter``) and
the loss curve (``plots``)."""
