"""Storage faults: a write to the output directory (or the data cache) that the OS refused.

A full disk, a spent quota, a read-only or failing filesystem is neither bad input nor a worker
crash: restarting the workers only fails again, and the error is the user's to fix with space, not
with a new config. Code that writes wraps the write in `writing(what, where)`; the OSError becomes a
`StorageError` that says what was being written and where, and each side ends the run with one
paragraph (the launcher adds the latest complete checkpoint). Imports only the stdlib.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Union

# The OS errors that mean "this storage cannot take the write", whatever was being written. An
# OSError with another errno inside a `writing` block is a storage error all the same (it is a
# write that failed); these are the ones recognised where no `writing` block named the write.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


class StorageError(Exception):
    """A write that failed: what was being written, where, and the OS error."""

    def __init__(self, what: str, where: Union[str, Path], error: str):
        super().__init__(f"could not write {what} to {where}: {error}")
        self.what, self.where, self.error = what, str(where), error


def os_error_text(err: OSError) -> str:
    """`[Errno 28] No space left on device`: the OS error without the file name, said elsewhere."""
    if err.errno is not None:  # the OS's own words: a library's (pyarrow's) text varies
        return f"[Errno {err.errno}] {os.strerror(err.errno)}"
    return str(err)


@contextlib.contextmanager
def writing(what: str, where: Union[str, Path], refusals_only: bool = False) -> Iterator[None]:
    """Turn an OSError raised by the writes inside into a StorageError naming them. `refusals_only`:
    only the STORAGE_ERRNOS ones, where the block also reads (a missing input stays what it is)."""
    try:
        yield
    except ConnectionError:
        raise  # a peer or a service went away: not the storage
    except OSError as err:
        if refusals_only and err.errno not in STORAGE_ERRNOS:
            raise
        raise StorageError(what, getattr(err, "filename", None) or where, os_error_text(err)) from None


def as_storage_error(err: BaseException) -> StorageError | None:
    """`err` as a StorageError when it is one, or an OSError of a refused write (STORAGE_ERRNOS)
    raised where no `writing` block named it (a library's own write); else None."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return StorageError("a file", err.filename or "the output directory", os_error_text(err))
    return None
