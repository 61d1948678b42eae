"""Exit codes of the verbs whose exit 1 is a verdict (``gate``: the candidate failed;
``pipeline reproduce``: the reproduction differs): there, an error (a refusal, a file that does
not load, a store that does not answer) exits :data:`EXIT_VERDICT_ERROR` (2), so a script can
tell "judged and rejected" from "could not judge". Other verbs keep exit 1 for an error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Final

from edgewise.runtime.errors import EdgewiseError

__all__ = ["EXIT_VERDICT_ERROR", "errors_exit_2"]

EXIT_VERDICT_ERROR: Final = 2


def errors_exit_2(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """``body(args)``; an edgewise error or an OSError is one line on stderr and exit 2."""
    try:
        return body(args)
    except EdgewiseError as exc:
        message = exc.message
    except OSError as exc:
        message = str(exc)
    print(f"edgewise {args.command}: error: {message}", file=sys.stderr)
    return EXIT_VERDICT_ERROR
