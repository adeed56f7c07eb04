"""What generation, the app, the server and evaluation share: loading a model as it was trained (``loading``),
explicit decoding and streamed generations (``generation``) on the one generation engine (``engine``)."""
