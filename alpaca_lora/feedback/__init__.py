"""Human feedback, ``alpaca-lora feedback`` (``python -m alpaca_lora.feedback``): the app's votes database
(``store``: answers as the model made them, ratings and comparisons) and ``export``, which turns the app's votes
and the arena's into TRL's preference formats (``prompt``/``chosen``/``rejected`` for DPO,
``prompt``/``completion``/``label`` for KTO) for ``alpaca-lora train recipe=dpo`` or ``recipe=kto``; ``voter`` is
the scripted voter of ``make demo-feedback`` (``demo``)."""
