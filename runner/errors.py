"""The few exceptions that end a command; failures of single items are data, not exceptions.

RunnerError            anything the CLI turns into a one-line message
├── SpecError          the job spec (or a file it names) is wrong: exit 2, nothing sent
├── UsageError         a command-line value is wrong: exit 2
└── RunAborted         a run-wide fault stopped the run: exit 3
    ├── OutputLocked   another run holds the output directory
    └── OutputError    the output directory cannot be written (disk full, permissions)
"""

from __future__ import annotations


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
    pass
