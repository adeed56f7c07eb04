"""``alpaca-lora arena`` (``python -m alpaca_lora.arena``): the blind pairwise comparison by people, in the
browser (``page``), and ``arena report``: their votes tallied, with agreement between voters and with a judge
(``report``)."""
