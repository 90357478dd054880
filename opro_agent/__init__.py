"""opro-agent: automatic prompt engineering, OPRO-style.

An optimizer LLM proposes instructions from a meta-prompt of past instructions and their
scores; a scorer LLM (or any chain) answers training questions under each instruction and is
graded against ground truth; the winner is chosen on validation and reported on test.
"""

from opro_agent.budget import Budget, RunObserver
from opro_agent.cache import ResponseCache
from opro_agent.errors import (
    BudgetExceededError,
    ConfigError,
    LLMCallsFailingError,
    LocalServerError,
    OproError,
    RunStoreError,
)
from opro_agent.llm_calls import RateLimits, RetryPolicy
from opro_agent.metrics import METRIC_NAMES, Metric, get_metric, metric_from_callable
from opro_agent.optimizer import OproOptimizer, evaluate_instruction, model_identity
from opro_agent.pricing import Price, PriceTable
from opro_agent.prompts import INSTRUCTION_POSITIONS, InstructionPosition, scorer_prompt
from opro_agent.result import HistoryEntry, OptimizationResult
from opro_agent.scorer import InstructionScore
from opro_agent.settings import RunResources, SearchSettings
from opro_agent.store import RunStore
from opro_agent.strategies import (
    Ape,
    Opro,
    Pe2,
    ProTeGi,
    Strategy,
    make_strategy,
    strategy_types,
)
from opro_agent.task import Example, SplitSpec, Task, TaskSplits

__all__ = [
    "INSTRUCTION_POSITIONS",
    "METRIC_NAMES",
    "Ape",
    "Budget",
    "BudgetExceededError",
    "ConfigError",
    "Example",
    "HistoryEntry",
    "InstructionPosition",
    "InstructionScore",
    "LLMCallsFailingError",
    "LocalServerError",
    "Metric",
    "Opro",
    "OproError",
    "OproOptimizer",
    "OptimizationResult",
    "Pe2",
    "Price",
    "PriceTable",
    "ProTeGi",
    "RateLimits",
    "ResponseCache",
    "RetryPolicy",
    "RunObserver",
    "RunResources",
    "RunStore",
    "RunStoreError",
    "SearchSettings",
    "SplitSpec",
    "Strategy",
    "Task",
    "TaskSplits",
    "evaluate_instruction",
    "get_metric",
    "make_strategy",
    "metric_from_callable",
    "model_identity",
    "scorer_prompt",
    "strategy_types",
]
