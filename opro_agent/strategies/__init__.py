"""Search strategies: what to propose and which proposals deserve full scoring.

`opro` (OPRO, the default), `ape` (APE), `protegi` (ProTeGi) and `pe2` (PE2) are built
in; packages add more through the `opro_agent.strategies` entry point group. See `base` for
the seam with the search.
"""

from opro_agent.strategies.ape import Ape
from opro_agent.strategies.base import (
    Candidate,
    Pool,
    Proposal,
    Rejected,
    SearchContext,
    StepCost,
    Strategy,
)
from opro_agent.strategies.opro import Opro
from opro_agent.strategies.pe2 import Pe2
from opro_agent.strategies.protegi import ProTeGi
from opro_agent.strategies.registry import (
    ENTRY_POINT_GROUP,
    StrategySpec,
    make_strategy,
    strategy_types,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Ape",
    "Candidate",
    "Opro",
    "Pe2",
    "Pool",
    "ProTeGi",
    "Proposal",
    "Rejected",
    "SearchContext",
    "StepCost",
    "Strategy",
    "StrategySpec",
    "make_strategy",
    "strategy_types",
]
