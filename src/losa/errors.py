"""User-facing errors.

Every problem a user can fix (bad config, missing file, unsupported model, NaN loss) raises
:class:`LosaError` with a one-line message that names the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations


class LosaError(Exception):
    """A problem with the user's input or environment, with a one-line explanation and fix."""


class SparsityVerificationError(LosaError):
    """A pruned model does not reach its sparsity target or its N:M pattern."""
