"""The one user-facing exception. The CLI alone turns it into a one-line message and exit code 2."""


class LoraDoctorError(Exception):
    """A problem with what the user asked for: a message quoting the bad value, and a hint with the fix."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"
