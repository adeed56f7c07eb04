"""alpaca-lora: reproduce and extend Stanford Alpaca cheaply.

The package follows the pipeline: ``data`` -> ``train`` -> merge -> generate/serve -> evaluate.
"""

__version__ = "0.1.0"
