"""The errors the data package raises for files that are missing or cannot be used.

Both are ``vit.errors.UserError``s, so the entry points print them as one message and exit
with status 2: the message names the file and says what was expected there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vit.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are missing (and could not be downloaded).

    The message is one paragraph: which dataset, the folder where its files were looked for,
    which files are expected there and how to get them.
    """

    @classmethod
    def for_files(cls, dataset: str, folder: str | Path, expected: Sequence[str], how: str) -> "DatasetNotFoundError":
        """The error for ``dataset`` whose ``expected`` files were looked for in ``folder``;
        ``how`` tells the reader how to get them."""
        folder = Path(folder).expanduser().resolve()
        missing = [name for name in expected if not (folder / name).exists()]
        return cls(
            f"{dataset} not found: looked for its files in {folder}, which should hold "
            f"{', '.join(expected)} (missing: {', '.join(missing) or 'none'}). {how}"
        )


class DataError(UserError, ValueError):
    """A dataset's files are there but cannot be used as they are: a truncated or damaged file,
    a file of another format, arrays of the wrong shape or type, a folder without images.

    A ValueError too, so that code catching the ValueErrors the data package used to raise
    keeps working.
    """
