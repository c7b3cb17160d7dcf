"""Error types that map to the CLI's exit codes, importable without torch.

Exit codes of every command wrapped by ``cli._user_errors``:

* 0 done (for ``diagnose``: robustness not overestimated);
* 1 the run failed (``train``: a non-finite loss) or, for ``diagnose``, overestimated;
* 2 bad input: any `BadInput` subclass, or a type listed in ``cli._bad_input_errors``;
* 3 inconclusive: `Inconclusive`, raised when no verdict can be decided;
* 4 the command itself failed unexpectedly: one line on stderr, the traceback in a log file.
"""

from __future__ import annotations


class BadInput(ValueError):
    """Input that cannot be used as given (exit 2); subclass it for a module's own errors."""


class Inconclusive(Exception):  # noqa: N818 - the outcome's name, as users read it
    """No verdict can be decided (exit 3); the message says why, in one line."""


class NeedsGPU(Inconclusive):  # noqa: N818 - as above
    """The input asks for a CUDA device this machine does not have (exit 3): nothing is
    wrong with the input, and nothing is marked failed; run it where there is a GPU."""
