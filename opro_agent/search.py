"""The search every strategy shares: score the initial instructions, run the strategy step
by step under the stop rules and the budget, then pick the winner on validation and report
it on test.

It implements the `SearchContext` a strategy sees. Every optimizer output and scorer answer
goes to the run store as it lands; a resumed run replays from the store (no answer is paid
twice) and, since strategies keep no state outside the pool and every random choice is
seeded by purpose, reaches the same result.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import zlib
from collections.abc import Awaitable, Mapping, Sequence

import structlog
from langchain_core.runnables import RunnableConfig

from opro_agent.budget import Meter, RunObserver, spend_from_usage
from opro_agent.candidates import dedupe_key, instruction_key, normalise_instruction
from opro_agent.errors import BudgetExceededError, LLMCallsFailingError
from opro_agent.llm_calls import Caller
from opro_agent.pricing import Price
from opro_agent.prompts import Message
from opro_agent.result import OptimizationResult
from opro_agent.scorer import InstructionScore, Scorer, gather_all
from opro_agent.settings import SearchSettings
from opro_agent.stats import Interval, PairedTest, interval, paired_test
from opro_agent.store import OptimizerCall, RunStore
from opro_agent.strategies.base import Candidate, Pool, Proposal, Rejected, Strategy
from opro_agent.task import Example, Task, TaskSplits

__all__ = ["Search", "final_calls", "racing_survivors"]

log = structlog.get_logger()


def racing_survivors(scores: Mapping[str, float], incumbent: float) -> set[str]:
    """Successive halving that never drops a contender: the better half go on (ties at the
    cut too), and so does any candidate scoring at or above `incumbent` (the best full-train
    score so far)."""
    ranked = sorted(scores.values(), reverse=True)
    cut = min(ranked[math.ceil(len(ranked) / 2) - 1], incumbent)
    return {text for text, score in scores.items() if score >= cut}


def final_calls(settings: SearchSettings, splits: TaskSplits, initial: int) -> int:
    """Calls to pick the winner on validation (the finalists and the `initial` instructions)
    and to score it and the initial ones on test."""
    validated = settings.validate_top + initial
    return validated * len(splits.validation) + (1 + initial) * len(splits.test)


def _mean(scored: InstructionScore | None) -> float | None:
    return None if scored is None else scored.score


def _scores(scored: InstructionScore) -> list[float]:
    return [r.score for r in scored.results.values()]


def _interval(scored: InstructionScore | None) -> Interval | None:
    return interval(_scores(scored)) if scored is not None and scored.results else None


def _paired(
    winner: InstructionScore | None, baseline: InstructionScore | None
) -> PairedTest | None:
    """The winner against the best initial instruction on the same test examples."""
    if winner is None or baseline is None or not winner.results:
        return None
    by_id = {example_id: r.score for example_id, r in winner.results.items()}
    return paired_test(by_id, {example_id: r.score for example_id, r in baseline.results.items()})


class Search:
    """One execution (or resumption) of a run of `strategy` on `task`."""

    def __init__(
        self,
        *,
        task: Task,
        strategy: Strategy,
        settings: SearchSettings,
        store: RunStore,
        run_id: str,
        proposer: Caller,
        scorer: Scorer,
        meter: Meter,
        prices: Mapping[str, Price],
        observer: RunObserver | None,
        seed_optimizer_calls: bool,
        config: RunnableConfig | None,
    ) -> None:
        self._task = task
        self._splits = task.splits()
        self._settings = settings
        self._pool = Pool()
        self.strategy = strategy
        self.store = store
        self.run_id = run_id
        self.proposer = proposer
        self.scorer = scorer
        self.meter = meter
        self.prices = prices
        self.observer = observer
        self.seed_calls = seed_optimizer_calls
        self.config = config
        self.started = time.perf_counter()
        self.saved_calls = 0
        self._initial = list(
            dict.fromkeys(normalise_instruction(i) for i in task.initial_instructions)
        )
        # One fixed order for the whole run: racing stages are nested prefixes of it, and a
        # resumed run races on the same examples.
        self._race_order = self.rng("race").sample(
            list(self._splits.train), len(self._splits.train)
        )
        self._asked = 0
        self._ask_errors: list[str] = []

    # -- the context a strategy sees -------------------------------------------------------------

    @property
    def task(self) -> Task:
        return self._task

    @property
    def splits(self) -> TaskSplits:
        return self._splits

    @property
    def settings(self) -> SearchSettings:
        return self._settings

    @property
    def pool(self) -> Pool:
        return self._pool

    def rng(self, *purpose: object) -> random.Random:
        return random.Random(":".join(str(part) for part in (self._settings.seed, *purpose)))

    async def ask(
        self, messages: Sequence[Message], *, step: int, kind: str, idx: int
    ) -> str | None:
        self._asked += 1
        stored = self.store.optimizer_call(self.run_id, step, kind, idx)
        if stored is not None:
            return stored.output
        metadata = {
            "opro_run_id": self.run_id,
            "opro_step": step,
            "opro_kind": kind,
            "opro_candidate": idx,
        }
        # Servers like llama.cpp derive unseeded samples from a running seed, so a sample would
        # depend on the order requests arrive in; a seed per call pins it.
        seed = zlib.crc32(f"{self._settings.seed}:{step}:{kind}:{idx}".encode())
        try:
            result = await self.proposer(
                list(messages),
                config=self.config,
                metadata=metadata,
                **({"seed": seed} if self.seed_calls else {}),
            )
            call = OptimizerCall(
                result.text, None, result.prompt_tokens, result.completion_tokens, result.cached
            )
        except BudgetExceededError:
            raise
        except Exception as exc:  # provider errors: recorded, the step goes on without it
            call = OptimizerCall(None, f"{type(exc).__name__}: {exc}"[:300])
            self._ask_errors.append(call.error or "")
            log.warning("optimizer.call_failed", step=step, kind=kind, idx=idx, error=call.error)
        self.store.record_optimizer_call(self.run_id, step, kind, idx, call)
        return call.output

    async def score(
        self, instruction: str, examples: Sequence[Example], *, step: int
    ) -> InstructionScore:
        return await self.scorer.score(instruction, examples, "train", step=step)

    async def evaluate(
        self,
        proposals: Sequence[Awaitable[Proposal | Rejected | None]],
        *,
        step: int,
        first_stage: int | None = None,
    ) -> list[Candidate]:
        order = self._race_order
        size = len(order) if first_stage is None else min(first_stage, len(order))
        arrived: dict[int, Proposal] = {}
        first_claim: dict[str, int] = {}  # dedupe key -> lowest index that arrived with it
        scoring: dict[str, asyncio.Future[InstructionScore]] = {}  # by exact text

        async def arrive(idx: int, pending: Awaitable[Proposal | Rejected | None]) -> None:
            outcome = await pending
            if outcome is None:
                return  # a failed call, logged where it failed
            if isinstance(outcome, Rejected):
                self._skip(step, idx, outcome.reason, outcome.output)
                return
            key = dedupe_key(outcome.text)
            reason = self._reject(outcome.text)
            if reason is None and first_claim.get(key, idx) < idx:
                reason = "duplicate"
            if reason is not None:
                self._skip(step, idx, reason, outcome.text)
                return
            # A duplicate of a later index that arrived first is scored too; which one
            # survives is decided by index below, so a resumed run keeps the same one.
            first_claim[key] = idx
            arrived[idx] = outcome
            if outcome.text not in scoring:
                scoring[outcome.text] = asyncio.ensure_future(
                    self.scorer.score(outcome.text, order[:size], "train", step=step)
                )
            await scoring[outcome.text]

        try:
            await gather_all(arrive(idx, p) for idx, p in enumerate(proposals))
        finally:
            for future in scoring.values():
                future.cancel()
        accepted: list[Proposal] = []
        keys: set[str] = set()
        for idx in sorted(arrived):
            proposal = arrived[idx]
            key = dedupe_key(proposal.text)
            if key in keys:
                self._skip(step, idx, "duplicate", proposal.text)
                continue
            keys.add(key)
            accepted.append(proposal)
            self._record_instruction(proposal, step)
        scored = [scoring[p.text].result() for p in accepted]
        return await self._race(accepted, scored, step, size)

    def screen(
        self, outcomes: Sequence[Proposal | Rejected | None], *, step: int
    ) -> list[Proposal]:
        kept: list[Proposal] = []
        keys: set[str] = set()
        for idx, outcome in enumerate(outcomes):
            if outcome is None:
                continue
            if isinstance(outcome, Rejected):
                self._skip(step, idx, outcome.reason, outcome.output)
                continue
            key = dedupe_key(outcome.text)
            reason = self._reject(outcome.text) or ("duplicate" if key in keys else None)
            if reason is not None:
                self._skip(step, idx, reason, outcome.text)
                continue
            keys.add(key)
            kept.append(outcome)
        return kept

    def add_partial(self, proposal: Proposal, scored: InstructionScore, *, step: int) -> Candidate:
        self._record_instruction(proposal, step)
        missing = len(self._splits.train) - len(scored.results)
        self.saved_calls += missing
        return self._add(proposal, scored, step, full=missing == 0)

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> OptimizationResult:
        stop_reason = "steps"
        try:
            self._plan(self._settings.steps)
            await self._score_initial()
            stop_reason = await self._steps()
        except BudgetExceededError as exc:
            log.warning("budget.spent", reason=str(exc))
            stop_reason = "budget"
        if not self._pool.ranked():
            if stop_reason == "budget":
                raise BudgetExceededError(
                    "the budget ran out before any instruction was scored on the whole "
                    "train split; raise it"
                )
            raise LLMCallsFailingError(
                "no instruction was scored on the whole train split: the task has no "
                "initial instructions and the strategy proposed none that could be scored"
            )
        return await self._finish(stop_reason)

    async def _steps(self) -> str:
        settings = self._settings
        best, stale = self._pool.best_train(), 0
        log.info("step.done", step=0, best_train=best)
        self._notify_step(0, best)
        for step in range(1, settings.steps + 1):
            if self._reached_target(best):
                return "target_score"
            # A step an earlier session began replays from the store; it is not charged again.
            replayed = self.store.has_optimizer_calls(self.run_id, step)
            needed = self.strategy.step_cost(step, self._splits).total + self._final_calls()
            if not replayed and not self.meter.affordable(needed):
                # `needed` is the worst case: every proposal scored on the whole split.
                log.warning(
                    "budget.stop", step=step, spent=self.meter.spent.calls, step_needs=needed
                )
                return "budget"
            before = len(self._pool)
            self._asked, self._ask_errors = 0, []
            await self.strategy.step(self, step)
            if self._asked and len(self._ask_errors) == self._asked:
                raise LLMCallsFailingError(
                    f"all {self._asked} optimizer calls of step {step} failed after retries "
                    f"(last: {self._ask_errors[-1]}); everything done so far is saved"
                )
            new_best = self._pool.best_train()
            stale = 0 if new_best > best else stale + 1
            best = new_best
            log.info(
                "step.done",
                step=step,
                candidates=len(self._pool) - before,
                best_train=best,
                stale=stale,
            )
            self._notify_step(step, best)
            self._plan(settings.steps - step)
            if settings.patience is not None and stale >= settings.patience:
                return "patience"
        return "target_score" if self._reached_target(best) else "steps"

    def _reached_target(self, best: float) -> bool:
        target = self._settings.target_score
        return target is not None and best >= target

    # -- planning ------------------------------------------------------------------------------

    def _final_calls(self) -> int:
        return final_calls(self._settings, self._splits, len(self._initial))

    def _plan(self, steps_left: int) -> None:
        if self.observer is None:
            return
        done = self._settings.steps - steps_left
        initial = 0 if len(self._pool) else len(self._initial)
        self.observer.on_plan(
            initial * len(self._splits.train)
            + sum(
                self.strategy.step_cost(step, self._splits).total
                for step in range(done + 1, self._settings.steps + 1)
            )
            + self._final_calls()
        )

    def _notify_step(self, step: int, best: float) -> None:
        if self.observer is not None:
            self.observer.on_step(step, best)

    # -- candidates -----------------------------------------------------------------------------

    def _reject(self, text: str) -> str | None:
        if len(text) > self._settings.max_instruction_chars:
            return "too_long"
        if text in self._pool:
            return "duplicate"
        return None

    def _skip(self, step: int, idx: int, reason: str, output: str) -> None:
        log.info("candidate.skipped", step=step, idx=idx, reason=reason, output=output[:200])

    def _record_instruction(self, proposal: Proposal, step: int) -> None:
        parent = None if proposal.parent is None else instruction_key(proposal.parent)
        self.store.add_instruction(
            self.run_id,
            instruction_key(proposal.text),
            proposal.text,
            step,
            origin="initial" if proposal.kind == "initial" else "optimizer",
            kind=proposal.kind,
            parent=parent,
        )

    async def _score_initial(self) -> None:
        proposals = [Proposal(text, "initial") for text in self._initial]
        for proposal in proposals:
            self._record_instruction(proposal, 0)
        scored = await self.scorer.score_many(self._initial, self._splits.train, "train", step=0)
        for proposal, result in zip(proposals, scored, strict=True):
            self._add(proposal, result, 0, full=True)

    async def _race(
        self,
        alive: list[Proposal],
        scored: list[InstructionScore],
        step: int,
        size: int,
    ) -> list[Candidate]:
        """Successive halving from `size` examples up to the whole training split."""
        order = self._race_order
        added: list[Candidate] = []
        while alive:
            if size == len(order):
                added += [
                    self._add(p, r, step, full=True) for p, r in zip(alive, scored, strict=True)
                ]
                break
            keep = racing_survivors(
                {r.instruction: self.strategy.fitness(r) for r in scored},
                self._pool.best_fitness(),
            )
            survivors: list[Proposal] = []
            for proposal, result in zip(alive, scored, strict=True):
                if result.instruction in keep:
                    survivors.append(proposal)
                    continue
                added.append(self._add(proposal, result, step, full=False))
                self.saved_calls += len(order) - size
                log.info(
                    "candidate.rejected_early",
                    step=step,
                    instruction=result.instruction,
                    train_subset=round(result.score, 4),
                    examples=size,
                )
            alive = survivors
            size = min(size * 2, len(order))
            scored = await self.scorer.score_many(
                [p.text for p in alive], order[:size], "train", step=step
            )
        return added

    def _add(
        self, proposal: Proposal, result: InstructionScore, step: int, *, full: bool
    ) -> Candidate:
        candidate = Candidate(
            proposal.text,
            step,
            len(self._pool),
            proposal.kind,
            proposal.parent,
            result,
            full,
            self.strategy.fitness(result),
        )
        self._pool.add(candidate)
        if full:
            log.info(
                "candidate.scored",
                step=step,
                kind=proposal.kind,
                instruction=proposal.text,
                train=round(result.score, 4),
            )
        return candidate

    # -- the final protocol ---------------------------------------------------------------------

    def _select(
        self,
        finalists: list[Candidate],
        initial: list[Candidate],
        validation: Mapping[str, InstructionScore],
    ) -> tuple[Candidate, str | None]:
        """The winner on validation, and why it is not a new instruction beating the best
        initial one there, when it is not."""

        def rank(c: Candidate) -> tuple[float, float, int]:
            return (validation[c.text].score, c.fitness, -c.order)

        new = [c for c in finalists if c.kind != "initial"]
        if not initial:
            return max(finalists, key=rank), None
        best_initial = max(initial, key=rank)
        if not new:
            return best_initial, "no new instruction was scored on the whole train split"
        best_new = max(new, key=rank)
        new_score, initial_score = (validation[c.text].score for c in (best_new, best_initial))
        if new_score > initial_score:
            return best_new, None
        versus = f"{new_score:.3f} against {initial_score:.3f} on validation"
        if self._settings.keep_initial_unless_better:
            return best_initial, f"no new instruction beat the best initial one ({versus})"
        winner = max(finalists, key=rank)
        if winner.kind == "initial":
            return winner, f"the best finalist on validation is an initial instruction ({versus})"
        return winner, f"the winner did not beat the best initial instruction ({versus})"

    async def _finish(self, stop_reason: str) -> OptimizationResult:
        splits = self._splits
        finalists = self._pool.ranked()[: self._settings.validate_top]
        initial = [c for c in self._pool if c.kind == "initial" and c.full]
        # The initial instructions are validated beside the finalists (do no harm).
        contenders = list({c.text: c for c in finalists + initial}.values())
        validation: dict[str, InstructionScore] = {}
        test: dict[str, InstructionScore] = {}
        winner, reason = finalists[0], None
        try:
            if splits.validation:
                scored = await self.scorer.score_many(
                    [c.text for c in contenders], splits.validation, "validation", step=-1
                )
                validation = {s.instruction: s for s in scored}
                winner, reason = self._select(finalists, initial, validation)
            # Only now, with the winner fixed, is the test split used.
            if splits.test:
                scored = await self.scorer.score_many(
                    list(dict.fromkeys([winner.text, *self._initial])), splits.test, "test", step=-1
                )
                test = {s.instruction: s for s in scored}
        except BudgetExceededError as exc:
            log.warning("budget.spent", reason=str(exc), phase="final evaluation")
            stop_reason = "budget"
            if not validation and splits.validation and initial:
                guard = self._settings.keep_initial_unless_better
                if guard:
                    winner = max(initial, key=lambda c: (c.fitness, -c.order))
                reason = "the budget ran out before the finalists were validated" + (
                    ": keeping the best initial instruction" if guard else ""
                )
        if reason is not None:
            log.warning("run.selection", reason=reason, instruction=winner.text)
        baselines = {text: test[text] for text in self._initial if text in test}
        best_baseline = max(baselines.values(), key=lambda s: s.score, default=None)
        usage = self.store.usage(self.run_id)
        result = OptimizationResult(
            run_id=self.run_id,
            task=self._task.name,
            strategy=self.strategy.name,
            best_instruction=winner.text,
            scores={
                "train": winner.train,
                "validation": _mean(validation.get(winner.text)),
                "test": _mean(test.get(winner.text)),
            },
            baselines={text: scored.score for text, scored in baselines.items()},
            intervals={
                "train": _interval(winner.scored),
                "validation": _interval(validation.get(winner.text)),
                "test": _interval(test.get(winner.text)),
            },
            baseline_intervals={
                text: interval(_scores(s)) for text, s in baselines.items() if s.results
            },
            test_comparison=_paired(test.get(winner.text), best_baseline),
            kept_initial=winner.kind == "initial",
            selection_reason=reason,
            history=tuple(self.store.history(self.run_id)),
            calls={"optimizer": usage["optimizer_calls"], "scorer": usage["scorer_calls"]},
            tokens={"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"]},
            cost=round(spend_from_usage(usage, self.prices).cost, 6) if self.prices else None,
            cache_hits=usage["cache_hits"],
            saved_by_early_rejection=self.saved_calls,
            wall_seconds=time.perf_counter() - self.started,
            stop_reason=stop_reason,
            instruction_position=self._task.instruction_position,
            input_fields=self._task.input_fields,
        )
        log.info(
            "run.done",
            run_id=self.run_id,
            strategy=self.strategy.name,
            best_instruction=winner.text,
            scores=dict(result.scores),
            test_gain=result.test_gain,
            stop_reason=stop_reason,
        )
        return result
