"""User-facing errors.

Every problem a user can fix (bad config, missing file, unsupported model, NaN loss) raises
:class:`LosaError` with a one-line message that names the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback. A setting that the Python API and
the command line both take is named in a fix as :func:`option` renders it: ``calib (--calib)``.
"""

from __future__ import annotations


class LosaError(Exception):
    """A problem with the user's input or environment, with a one-line explanation and fix."""


class SparsityVerificationError(LosaError):
    """A pruned model does not reach its sparsity target or its N:M pattern."""


def option(param: str, flag: str | None = None) -> str:
    """How an error message names a setting that both the Python API and the command line take: the API
    parameter first, the command-line flag in parentheses, so that either kind of user finds the fix.

    Args:
        param: the Python name, as a user of the API writes it: a keyword argument or config field
            (``calib``), a nested field (``finetune.max_length``), or a field with the value to set
            (``resume=True``, ``method='magnitude'``).
        flag: the command-line form (``--out``, ``--method magnitude``); default ``"--" + param`` with
            ``_`` as ``-``, which fits a bare field name only: pass it for anything else (a value, a
            nested field, or a flag named unlike the parameter).
    Returns:
        ``"param (flag)"``, e.g. ``option("data_dir")`` is ``"data_dir (--data-dir)"`` and
        ``option("out_dir", "--out")`` is ``"out_dir (--out)"``.
    """
    return f"{param} ({flag if flag is not None else '--' + param.replace('_', '-')})"


#: the fix for a model loaded without a tokenizer (a directory without tokenizer files), after "X needs a tokenizer"
NO_TOKENIZER_FIX = ("the model was loaded without one (no tokenizer files beside its weights); copy the original "
                    "model's tokenizer files into its directory "
                    "(AutoTokenizer.from_pretrained(original).save_pretrained(dir)), or pass a tokenizer from Python")
