"""Errors a user can act on.

Every error raised for bad input names the file or field at fault and says how to fix it, so the
ComfyUI node, the CLI and the tests can show the message as it is.
"""


class TrainerInputError(ValueError):
    """Bad input from the user: the message names the file/field and the fix."""


class TrainingStopped(RuntimeError):
    """Training stopped before the requested step count (interrupt or non-finite loss).

    ``checkpoint`` is the resumable checkpoint folder that was kept, or None if none could be written.
    """

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
