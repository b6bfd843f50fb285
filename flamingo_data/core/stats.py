"""Counts by outcome and by reason: every drop is counted with a reason, nothing is lost silently."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stats:
    """``counts[category][outcome]`` and ``reasons[category][reason]``, e.g. documents/rejected/bad_json."""

    converter: str = ""
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    reasons: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, category: str, outcome: str, n: int = 1) -> None:
        self.counts[category][outcome] += n

    def reject(self, category: str, reason: str, n: int = 1) -> None:
        """Count one rejected item of ``category`` and why."""
        self.counts[category]["rejected"] += n
        self.reasons[category][reason] += n

    def get(self, category: str, outcome: str) -> int:
        return self.counts.get(category, Counter()).get(outcome, 0)

    def merge(self, other: Stats) -> None:
        for cat, ctr in other.counts.items():
            self.counts[cat].update(ctr)
        for cat, ctr in other.reasons.items():
            self.reasons[cat].update(ctr)

    def to_json(self) -> dict[str, Any]:
        return {
            "converter": self.converter,
            "counts": {c: dict(sorted(v.items())) for c, v in sorted(self.counts.items())},
            "reasons": {c: dict(sorted(v.items())) for c, v in sorted(self.reasons.items()) if v},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Stats:
        stats = cls(converter=obj.get("converter", ""))
        for cat, ctr in obj.get("counts", {}).items():
            stats.counts[cat].update(ctr)
        for cat, ctr in obj.get("reasons", {}).items():
            stats.reasons[cat].update(ctr)
        return stats

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        return cls.from_json(json.loads(Path(path).read_text()))
