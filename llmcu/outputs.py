"""Output paths, checked before the work starts.

A run that cannot write its results should fail in its first second, not after
the model is built and the data read, and the message should name the path the
user typed (not a temporary file beside it). check_dir and check_file do that by
trying: they create what is missing, write and delete a small probe file, and
remove again any directory they created, so a check leaves nothing behind.
`os.access` would not do: it says yes to root on a read-only filesystem.
"""

from __future__ import annotations

import os


class OutputError(ValueError):
    """An output path that cannot be written; the message names the flag and the path."""


def _missing_parents(path: str) -> list[str]:
    """The directories os.makedirs(path) would create, deepest first."""
    made = []
    while path and not os.path.exists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return made


def _probe(directory: str) -> str | None:
    """None if a file can be created in `directory` (made if missing, then removed
    again with any parent this made); else the OS's reason."""
    made = _missing_parents(os.path.abspath(directory))
    probe = os.path.join(directory, f".llmcu-write-check-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "xb"):
            pass
        os.remove(probe)
        return None
    except OSError as e:
        return e.strerror or str(e)
    finally:
        for d in made:  # deepest first: leave the filesystem as it was
            try:
                os.rmdir(d)
            except OSError:
                break


def check_dir(path, flag: str) -> None:
    """Raise OutputError unless files can be created in directory `path` (made if missing)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path}: is a file, expected a directory (or a name to create)")
    reason = _probe(path)
    if reason:
        raise OutputError(f"{flag} {path}: cannot write there ({reason})")


def check_file(path, flag: str) -> None:
    """Raise OutputError unless a file can be written (created or replaced) at `path`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path}: is a directory, expected a file name")
    directory = os.path.dirname(path) or "."
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputError(f"{flag} {path}: {directory} is a file, not a directory")
    reason = _probe(directory)
    if reason:
        raise OutputError(f"{flag} {path}: cannot write there ({reason})")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path and the OS's reason, without the errno noise."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
