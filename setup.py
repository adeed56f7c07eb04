"""The package list, the one thing pyproject.toml cannot say: recipes/ sits at the top of the repository (beside
alpaca_lora/, tests/ and notebooks/, as torchtune keeps its recipes) and ships inside the wheel as
alpaca_lora/recipes, where alpaca_lora.train.config looks first. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["alpaca_lora*"]), "alpaca_lora.recipes"],
      package_dir={"alpaca_lora.recipes": "recipes"})
