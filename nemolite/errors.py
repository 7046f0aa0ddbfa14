"""The one exception type for errors a user can cause (bad input, unsupported checkpoint)."""


class NemoliteError(ValueError):
    """A problem with what the user gave us; the message says what to do about it.

    The server turns it into a 4xx JSON body; the CLI prints it without a traceback.
    """
