"""Typed errors: every failure a user can cause is one of these, with a one-line message that names
what is wrong and what to do. The CLI maps each class to its own exit code, so CI jobs can tell a
bad model from a failed verification without parsing text.

Stdlib only: the runtime raises these too.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty), cut to
    `limit` characters: what a one-line error quotes from a library's multi-line traceback text."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class SplitcError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ModelLoadError(SplitcError):
    """The model file or factory cannot be loaded or exported."""

    exit_code = 3


class TargetError(SplitcError):
    """Unknown target, malformed target file, or a target chain that cannot work."""

    exit_code = 4


class UnsupportedOperatorError(SplitcError):
    """A node's operator cannot be taken by the backend of the target it was placed on."""

    exit_code = 5


class CutError(SplitcError):
    """A requested cut does not name a node, or cannot split the graph as asked."""

    exit_code = 6


class InputError(SplitcError):
    """Inputs at run time (or example inputs at compile time) do not match the model."""

    exit_code = 7


class BundleError(SplitcError):
    """A bundle is missing, corrupt, tampered with, or of an unknown schema version."""

    exit_code = 8


class BackendError(SplitcError):
    """A backend failed to compile or load an artifact."""

    exit_code = 9


class ToolchainError(SplitcError):
    """A tool splitc needs (cross compiler, emulator, backend library) is missing or broken."""

    exit_code = 11


class PlanError(SplitcError):
    """No placement meets the constraints, or the planner's inputs cannot work together."""

    exit_code = 12


class RemoteError(SplitcError):
    """The remote inference server cannot be reached, refused the request, or answered nonsense."""

    exit_code = 13


class VerificationFailed(SplitcError):
    """At least one artifact disagrees with the torch reference beyond its tolerance."""

    exit_code = 10
