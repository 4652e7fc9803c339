"""Errors a user can fix. Stages turn them into one line on stderr and exit code 2."""


class InputError(Exception):
    """Bad input: invalid params, a missing or unreadable file, a corrupt artifact."""


class ConfigError(InputError):
    """An invalid params value; `key` is its dotted name (`tokenizer.vocab_size`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class TrainingDiverged(InputError):
    """The loss or the weights became inf or nan: the params (usually the learning rate) do not train."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run (after writing a checkpoint, on the first signal). Stages exit with
    128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(err: BaseException) -> str:
    """What an error says, in one line: its first non-empty line (a library's message can run to pages: a server
    response, a traceback of its own), or the error's type when it says nothing."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
