"""The Alpaca data layer shared by every recipe: templates, loading and validation, examples."""
