"""User-facing errors: one line that says what was wrong and what to do."""


class StableRegionsError(Exception):
    """An error caused by the input (prompt, model, options), not by a bug.

    The CLI prints ``error: <message>`` on one line and exits non-zero.
    """


class ModelNotInstalledError(StableRegionsError):
    """A bundled model is requested but its weights are not on this machine."""


class UnsupportedModelError(StableRegionsError):
    """The model is not a supported causal decoder LM."""
