"""``eval.json`` and ``eval.md``, rewritten after every row: an interrupted or crashed run keeps
every row it finished, and the next run with the same settings resumes from them.

``eval.json`` holds ``run`` (the settings rows depend on, whether the run completed, and one
``sessions`` entry per invocation that finished: its phases, process times and how many rows it
computed or reused), ``environment``, ``datasets`` (a label per dataset) and ``results`` (one
object per :class:`Result`, infinite SNRs as null).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from qkv.evaluation.report import format_markdown
from qkv.evaluation.runner import Result

# what a row depends on besides its dataset, policy and spec: rows saved under other values
# are not reused
RUN_KEYS = ("selection", "device", "dtype")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _row(result: Result) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in vars(result).items()}


def _result(row: dict[str, Any]) -> Result:
    fields = dict(row)
    for key in ("snr_k_db", "snr_v_db"):
        if fields[key] is None:
            fields[key] = math.inf
    return Result(**fields)


class ResultsFile:
    """The rows of one evaluation in ``folder`` (``eval.json`` and ``eval.md``).

    ``run``: the settings, with at least :data:`RUN_KEYS`. Rows already in ``eval.json`` under the
    same :data:`RUN_KEYS` are offered by :meth:`saved` (unless ``restart``).
    """

    def __init__(self, folder: Path, run: dict[str, Any], environment: dict[str, str], *, restart: bool = False):
        self.folder = Path(folder)
        self.json_path = self.folder / "eval.json"
        self.md_path = self.folder / "eval.md"
        self.run = {**run, "complete": False, "sessions": []}
        self.environment = environment
        self.labels: dict[str, str] = {}
        self.results: list[Result] = []
        self._saved: dict[tuple[str, str, str], Result] = {}
        self.ignored: str | None = None  # why an existing eval.json is not resumed from
        if not restart:
            self._read_saved()

    def _read_saved(self) -> None:
        try:
            payload = json.loads(self.json_path.read_text())
            rows = [_result(r) for r in payload["results"]]
            same = all(payload["run"][k] == self.run[k] for k in RUN_KEYS)
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):  # not an eval.json of this version
            self.ignored = f"{self.json_path} is not readable as results; starting over"
            return
        if not same:
            theirs = ", ".join(f"{k}={payload['run'][k]}" for k in RUN_KEYS)
            self.ignored = f"{self.json_path} holds {len(rows)} rows made with {theirs}; starting over"
            return
        self._saved = {(r.dataset, r.policy, r.spec): r for r in rows}
        self.run["sessions"] = payload["run"].get("sessions", [])

    def saved(self, dataset: str, policy: str, spec: str) -> Result | None:
        """The row saved by an earlier run with the same settings, if any."""
        return self._saved.get((dataset, policy, spec))

    @property
    def resumable(self) -> int:
        """Rows an earlier run saved that this run can reuse."""
        return len(self._saved)

    def set_label(self, dataset: str, label: str) -> None:
        self.labels[dataset] = label

    def add(self, result: Result) -> None:
        """Append a row and rewrite both files."""
        self.results.append(result)
        self.write()

    def finish(self, **session: Any) -> None:
        """Mark the run complete, append ``session`` (phases, process times) and rewrite."""
        self.run["sessions"].append(session)
        self.run["complete"] = True
        self.write()

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {
            "run": self.run,
            "environment": self.environment,
            "datasets": self.labels,
            "results": [_row(r) for r in self.results],
        }
        _write_atomic(self.json_path, json.dumps(payload, indent=1) + "\n")
        _write_atomic(self.md_path, format_markdown(self.results, self.labels))
