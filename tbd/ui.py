"""What every tbd command and library function prints with, and the error it reports without a traceback."""

from __future__ import annotations

import os

from rich.console import Console

#: output to a file or pipe (a log, CI) would be wrapped at rich's 80 columns, which folds the final
#: tables; 120 unless COLUMNS says otherwise
REDIRECTED_WIDTH = 120
console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = REDIRECTED_WIDTH


class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback."""
