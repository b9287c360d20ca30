"""The failures zimage reports on one line, defined apart from the code that raises them so that the command line
can name them without importing torch."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input found before any work: reported on one line, exit code 2."""


class WeightsError(Exception):
    """A checkpoint file or tensor is missing, damaged, or does not fit the model."""


class MissingFileError(WeightsError):
    """A file the published layout requires is absent."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says what was being made."""


class NonFiniteLatents(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"the latents became NaN or Inf at step {step + 1}")
        self.step = step


class NonFiniteImage(ValueError):
    """A decoded image holds NaN or Inf: written out it would be a black (or speckled) picture."""
