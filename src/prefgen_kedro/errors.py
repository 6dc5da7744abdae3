"""The project's error for bad input: data or configuration a run cannot use.

Raised with a message that names the file, row, key or artifact at fault, it is reported on
the console without a traceback (``hooks.ConsoleErrorHook``): the message is the whole story.
"""


class BadInputError(ValueError):
    """Input data or settings that a run refuses; the message says what and where."""
