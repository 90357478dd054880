"""opro-agent: automatic prompt engineering, OPRO-style.

An optimizer LLM proposes instructions from a meta-prompt of past instructions and their
scores; a scorer LLM (or any chain) answers training questions under each instruction and is
graded against ground truth; the winner is chosen on validation and reported on test.
"""

from opro_agent.errors import (
    BudgetExceededError,
    ConfigError,
    LLMCallsFailingError,
    LocalServerError,
    OproError,
    RunStoreError,
)
from opro_agent.llm_calls import RetryPolicy
from opro_agent.metrics import METRIC_NAMES, Metric, get_metric, metric_from_callable
from opro_agent.optimizer import (
    HistoryEntry,
    OproOptimizer,
    OproSettings,
    OptimizationResult,
    evaluate_instruction,
)
from opro_agent.prompts import INSTRUCTION_POSITIONS, InstructionPosition, scorer_prompt
from opro_agent.scorer import InstructionScore
from opro_agent.store import RunStore
from opro_agent.task import Example, SplitSpec, Task, TaskSplits

__all__ = [
    "INSTRUCTION_POSITIONS",
    "METRIC_NAMES",
    "BudgetExceededError",
    "ConfigError",
    "Example",
    "HistoryEntry",
    "InstructionPosition",
    "InstructionScore",
    "LLMCallsFailingError",
    "LocalServerError",
    "Metric",
    "OproError",
    "OproOptimizer",
    "OproSettings",
    "OptimizationResult",
    "RetryPolicy",
    "RunStore",
    "RunStoreError",
    "SplitSpec",
    "Task",
    "TaskSplits",
    "evaluate_instruction",
    "get_metric",
    "metric_from_callable",
    "scorer_prompt",
]
