"""What the engine raises: a request that failed, or one it could not take."""


class EngineError(Exception):
    """A request failed while generating (the message says why)."""


class QueueFull(Exception):
    """Every place in the batch and in the queue is taken."""
