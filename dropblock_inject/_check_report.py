"""The report :func:`~dropblock_inject.check` returns: one stage per check, a verdict, what to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckReport", "Stage"]


@dataclass(frozen=True)
class Stage:
    """One check's outcome.

    Attributes:
        name: what was checked ("plan", "eval identity", ...).
        status: ``"ok"``, ``"fail"`` or ``"skipped"``.
        detail: what was seen.
        fix: for a failure, what to do about it.
    """

    name: str
    status: str
    detail: str = ""
    fix: str = ""


@dataclass
class CheckReport:
    """What :func:`~dropblock_inject.check` found; ``print(report)`` shows it as a short text.

    Attributes:
        model: the model's class name.
        recipe: the recipe's name.
        points: the plan (:class:`~dropblock_inject.InsertionPoint` list; empty if planning failed).
        stages: one :class:`Stage` per check, in the order they ran.
        notes: warnings worth reading even when every stage passed.
        dropblock_inputs: the input shape each DropBlock saw in the training step, by module path.
        inject_seconds: how long ``inject`` took (NaN if it did not run).
    """

    model: str
    recipe: str
    points: list[Any] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropblock_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    inject_seconds: float = float("nan")

    @property
    def ok(self) -> bool:
        """Whether no stage failed."""
        return not self.failures

    @property
    def failures(self) -> list[Stage]:
        """The stages that failed."""
        return [s for s in self.stages if s.status == "fail"]

    def add(self, name: str, status: str, detail: str = "", fix: str = "") -> None:
        """Record one stage's outcome.

        Args:
            name: the stage.
            status: ``"ok"``, ``"fail"`` or ``"skipped"``.
            detail: what was seen.
            fix: for a failure, what to do.
        """
        self.stages.append(Stage(name, status, detail, fix))

    def __str__(self) -> str:
        width = max((len(s.name) for s in self.stages), default=0)
        lines = [f"check of {self.model} with recipe {self.recipe}"]
        for s in self.stages:
            lines.append(f"  {s.status.upper():7s} {s.name.ljust(width)}  {s.detail}".rstrip())
            if s.fix:
                lines.append(f"          {' ' * width}  what to do: {s.fix}")
        lines += [f"  note: {n}" for n in dict.fromkeys(self.notes)]
        failed = self.failures
        lines.append(f"verdict: {'PASS' if not failed else 'FAIL'}"
                     + (f" ({len(failed)} failed: {', '.join(s.name for s in failed)})" if failed else ""))
        return "\n".join(lines)
