"""The few exceptions that end a command; failures of single items are data, not exceptions.

RunnerError            anything the CLI turns into a one-line message
├── SpecError          the job spec (or a file it names) is wrong: exit 2, nothing sent
├── UsageError         a command-line value is wrong: exit 2
└── RunAborted         a run-wide fault stopped the run: exit 3
    ├── OutputLocked   another run holds the output directory
    └── OutputError    the output directory cannot be written (disk full, permissions)
"""

from __future__ import annotations

import os


class RunnerError(Exception):
    exit_code = 1


class SpecError(RunnerError):
    exit_code = 2

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class UsageError(RunnerError):
    exit_code = 2


class RunAborted(RunnerError):
    exit_code = 3


class OutputLocked(RunAborted):
    pass


class OutputError(RunAborted):
    errno: int | None = None  # of the OSError behind it, when there was one
    why: str = ""  # the cause in a few words ("disk full")


def secrets_in_env() -> list[str]:
    """Values of environment variables named like keys (…KEY, …TOKEN, …SECRET): whichever a
    spec's api_key_env names, a bug report must not carry it."""
    names = ("KEY", "TOKEN", "SECRET", "PASSWORD")
    return [v for k, v in os.environ.items() if k.upper().endswith(names) and len(v) >= 8]


def write_details(exc: BaseException, context: str, secret: str | None = None) -> str:
    """Write a bug's traceback where a person can find it (the temp dir, one file per process,
    never through a link, the key scrubbed, and any variable's value named like a key); returns its path."""
    import tempfile
    import time
    import traceback

    from .safety import safe_text

    text = safe_text("".join(traceback.format_exception(exc)), secret, limit=200_000)
    for value in secrets_in_env():
        text = safe_text(text, value, limit=200_000)
    path = os.path.join(tempfile.gettempdir(), f"runner-error-{time.strftime('%Y%m%d')}-{os.getpid()}.log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {context}\n{text}\n")
    except OSError:
        return "nowhere (the temp dir is not writable)"
    return path
