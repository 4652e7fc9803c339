"""A GPT-style language model built from raw text: the library behind the `stages` commands."""
