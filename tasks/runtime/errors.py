"""The two errors a user can act on: bad input (a data file, a model folder) and a bad config.
Each prints as one line naming the file and line or record, or the argument (flows/ops/cli.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path


class DataError(ValueError):
    """Bad input: names the file, the line or record, and what is wrong (`hint`: what to do
    about it; `stage`: set by the flow that ran the stage)."""

    def __init__(self, path: Path | str, reason: str, *, line: int | None = None,
                 record: int | None = None, json_path: str | None = None,
                 hint: str | None = None):
        self.path, self.reason, self.line, self.record, self.json_path = (
            str(path), reason, line, record, json_path)
        self.hint, self.stage = hint, None
        where = str(path)
        if line is not None:
            where += f":{line}"
        if record is not None:
            where += f" record #{record}"
        if json_path:
            where += f" at {json_path}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        """Pickled with its fields (a stage computed in a child process hands it back)."""
        return (partial(type(self), self.path, self.reason, line=self.line, record=self.record,
                        json_path=self.json_path, hint=self.hint), (), {"stage": self.stage})


class ConfigError(DataError):
    """A bad config: names the config file and line, or the `--set` argument."""
