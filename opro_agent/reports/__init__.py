"""Run reports: what a run did, as data (`RunReport`, `RunsComparison`) and as one
self-contained HTML file (`opro_agent.reports.html`, which needs the `report` extra:
matplotlib draws the charts).

The data layer imports no plotting library, so it works without the extra.
"""

from opro_agent.reports.comparison import RunRow, RunsComparison
from opro_agent.reports.data import (
    ExampleChange,
    InstructionStats,
    PhaseTime,
    RunReport,
    StepBest,
    TestComparison,
    Usage,
)

__all__ = [
    "ExampleChange",
    "InstructionStats",
    "PhaseTime",
    "RunReport",
    "RunRow",
    "RunsComparison",
    "StepBest",
    "TestComparison",
    "Usage",
]
