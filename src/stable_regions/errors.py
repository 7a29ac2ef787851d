"""User-facing errors: one line that says what was wrong and what to do."""


class StableRegionsError(Exception):
    """An error caused by the input (prompt, model, options), not by a bug.

    The CLI prints ``error: <message>`` on one line and exits non-zero.
    """


class ModelNotInstalledError(StableRegionsError):
    """A bundled model is requested but its weights are not on this machine."""


class UnsupportedModelError(StableRegionsError):
    """The model is not a supported causal decoder LM."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
