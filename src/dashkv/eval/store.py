"""Results cache: one JSON line per (task, length, sample, method, budget), appended as soon as it is
measured, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path


def record_key(task: str, length: int, sample: int, method: str, budget: float | None) -> tuple:
    return (task, int(length), int(sample), method, None if budget is None else round(float(budget), 6))


class ResultStore:
    """Append-only JSON-lines file of result records, keyed by :func:`record_key`.

    Parameters
    ----------
    path : Path -- the ``.jsonl`` file (created with its folder if missing)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[tuple, dict] = {}
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write; it is measured again
                self.records[self._key(record)] = record

    @staticmethod
    def _key(record: dict) -> tuple:
        return record_key(record["task"], record["length"], record["sample"], record["method"], record["budget"])

    def has(self, task: str, length: int, sample: int, method: str, budget: float | None) -> bool:
        return record_key(task, length, sample, method, budget) in self.records

    def add(self, record: dict) -> None:
        self.records[self._key(record)] = record
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def all(self) -> list[dict]:
        return list(self.records.values())
