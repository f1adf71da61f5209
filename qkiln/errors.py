"""Exceptions with a meaning for the user, and the exit codes the CLI maps them to.

0 ok, 1 a validation gate failed, 2 bad input or usage, 3 internal error.
A `UserError` message is one line that says what was wrong and what to do; the CLI prints it
without a traceback.
"""

from __future__ import annotations


class QkilnError(Exception):
    """Base of every error qkiln raises on purpose."""

    exit_code = 3


class UserError(QkilnError):
    """The input (a file, an option, a recipe) is wrong; the message says what to do."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint directory or safetensors file is malformed or unsupported."""


class GGUFError(UserError):
    """A GGUF file is malformed, truncated or not a GGUF at all."""


class QuantizeError(UserError):
    """A scheme, group size, weight or calibration input cannot be quantized as asked."""


class GateFailed(QkilnError):
    """An accuracy or speed threshold was not met (a CI job should fail)."""

    exit_code = 1
