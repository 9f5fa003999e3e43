"""One exception type for everything a user can get wrong.

Every error names the bad value and says what to do next; the CLI prints it without a traceback.
"""


class SteerscaleError(ValueError):
    """A user-facing error: a message that names the problem, plus a hint for the fix."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem if hint is None else f"{problem}\n  hint: {hint}")
