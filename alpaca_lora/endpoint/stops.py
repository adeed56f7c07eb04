"""How a long run of requests ends (``evaluate answer``, ``evaluate judge``, the data builder): one exit code per
reason it stopped, so a script can tell a finished run from one to run again, and SIGTERM (a scheduler's
preemption, ``kill``) stopping it as Ctrl-C does, so its journal and outputs are written on the way out.

2 is taken by bad input (:func:`alpaca_lora.common.errors.exit_on_user_error`).
"""

from __future__ import annotations

import signal
import threading

EXIT_CODES = {
    "finished": 0,
    "nothing_left": 0,       # every remaining item was tried this run; the report says what is missing
    "endpoint_failing": 1,   # MAX_CONSECUTIVE_FAILURES failed requests in a row: the endpoint is down or refuses us
    "items_failed": 1,       # some items got no answer (a prompt longer than the local model's context), each named
    "max_cost": 3,           # stopped before the spend would pass max_cost: raise it and run the same command
    "max_requests": 3,       # likewise for max_requests
    "no_verdict": 4,         # the judge: too many judgments without a verdict (past max_unparseable)
    "interrupted": 130,      # Ctrl-C or SIGTERM, as a shell reports SIGINT
}


def exit_code(stop: str, default: int = 0) -> int:
    """The exit code of a run that stopped for ``stop`` (a reason returned by the runner)."""
    return EXIT_CODES.get(stop, default)


def stop_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: the runner stops cleanly and the outputs are written.
    Signal handlers belong to the main thread; elsewhere (a test's thread) this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _like_ctrl_c)


def _like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt
