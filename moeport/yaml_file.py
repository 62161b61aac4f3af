"""Reading a YAML file the user gave: its data, or one line naming the file, the place and the problem."""

from __future__ import annotations

from typing import Any

import yaml

from moeport.base.errors import UserError


def read_yaml(path: str, what: str) -> Any:
    """The data in YAML file `path` (of `what`, for the messages); a UserError naming the file (and the line and
    column of malformed YAML) when it cannot be read or parsed."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: malformed YAML: {problem}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what}: {exc.strerror}") from None
