"""What the engine raises: a request that failed, or one it could not take."""


class EngineError(Exception):
    """A request failed while generating (the message says why)."""


class PromptTooLong(EngineError):
    """A prompt the model's context (or the engine's KV cache) cannot hold with one generated token: refused alone,
    before it reaches the batch."""


class EngineStopped(EngineError):
    """The engine is stopping (a server shutting down): the request ended, or was not taken."""


class QueueFull(Exception):
    """Every place in the batch and in the queue is taken."""
