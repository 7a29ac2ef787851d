"""User-facing errors: one line that says what was wrong and what to do.

Every error the library raises on purpose is a ``StableRegionsError``; catching that one
class catches them all. The subclasses also derive from the built-in exception a caller
would expect, so ``except ValueError`` or ``except FileNotFoundError`` work too:

- ``InvalidParameterError`` (``ValueError``): a parameter out of range or of the wrong kind;
- ``ModelNotFoundError`` (``FileNotFoundError``): no model where one was named;
  ``ModelNotInstalledError`` is the bundled-model case;
- ``UnsupportedModelError``: a model stable-regions cannot analyse;
- ``OutputPathError``: a file or directory a study cannot write, found before any work.

Messages name the library's parameters; the command line translates them to its flags.
"""


class StableRegionsError(Exception):
    """An error caused by the input (prompt, model, options), not by a bug.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """


class InvalidParameterError(StableRegionsError, ValueError):
    """A parameter has a value the study cannot use."""


class ModelNotFoundError(StableRegionsError, FileNotFoundError):
    """No model where the name, path or Hub id pointed."""


class ModelNotInstalledError(ModelNotFoundError):
    """A bundled model is requested but its weights are not on this machine."""


class UnsupportedModelError(StableRegionsError):
    """The model is not a supported causal decoder LM."""


class OutputPathError(StableRegionsError):
    """A file or directory the study would write cannot be written there."""


class StableRegionsWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one
    ``note:`` line)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
