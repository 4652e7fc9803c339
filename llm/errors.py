"""Errors a user can fix. Stages turn them into one line on stderr and exit code 2."""


class InputError(Exception):
    """Bad input: invalid params, a missing or unreadable file, a corrupt artifact."""


class ConfigError(InputError):
    """An invalid params value; `key` is its dotted name (`tokenizer.vocab_size`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
