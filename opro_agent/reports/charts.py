"""The report's charts, drawn with matplotlib (Agg, no display) as PNG bytes.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no global state, so
charts can be drawn from any thread and nothing leaks between reports. PNGs are written
without a timestamp, so the same run gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from opro_agent.reports.comparison import RunsComparison
from opro_agent.reports.data import PHASES, ROLES, InstructionStats, RunReport

__all__ = [
    "comparison_curves",
    "comparison_scores",
    "finalists_chart",
    "lineage_chart",
    "search_chart",
    "test_chart",
    "usage_chart",
]

DPI = 110
INK = "#1f2933"
GRID = "#d9dee3"
CANDIDATE = "#4c72b0"
INITIAL = "#6b7280"
BEST = "#dd8452"
WINNER = "#c0392b"
ROLE_COLOURS = {"optimizer": "#8172b3", "scorer": "#55a868"}
KIND_COLOURS = {
    "initial": INITIAL,
    "proposal": CANDIDATE,
    "forward": "#4c72b0",
    "reverse": "#55a868",
    "resample": "#dd8452",
}
RUN_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.set_facecolor("white")
    return fig


def _style(ax: Axes) -> None:
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(colors=INK, labelsize=9)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def label(text: str, limit: int = 60) -> str:
    """An instruction as a chart label: one line, shortened, with `$` kept literal."""
    flat = " ".join(text.split())
    if len(flat) > limit:
        flat = flat[: limit - 1].rstrip() + "…"
    return flat.replace("$", r"\$") or "(empty)"


def _score_limits(ax: Axes, values: Sequence[float]) -> None:
    if values and min(values) >= 0.0 and max(values) <= 1.0:
        ax.set_ylim(-0.04, 1.04)


# -- one run ------------------------------------------------------------------------------------


def search_chart(report: RunReport) -> bytes | None:
    """Every candidate's train score per step, the best-so-far curve and the winner."""
    scored = [i for i in report.instructions if i.train is not None]
    if not scored:
        return None
    fig = _figure(9.5, 4.4)
    ax = fig.add_subplot()
    _style(ax)
    steps = report.steps
    by_step: dict[int, list[InstructionStats]] = {}
    for item in scored:
        by_step.setdefault(item.step, []).append(item)
    full_x: list[float] = []
    full_y: list[float] = []
    early_x: list[float] = []
    early_y: list[float] = []
    initial_x: list[float] = []
    initial_y: list[float] = []
    winner_xy: tuple[float, float] | None = None
    for step, items in by_step.items():
        for n, item in enumerate(items):
            x = step + (0.0 if len(items) == 1 else 0.56 * (n / (len(items) - 1) - 0.5))
            assert item.train is not None
            y = item.train.mean
            if item.initial:
                initial_x.append(x)
                initial_y.append(y)
            elif item.fully_scored:
                full_x.append(x)
                full_y.append(y)
            else:
                early_x.append(x)
                early_y.append(y)
            if item.text == report.winner:
                winner_xy = (x, y)
    if initial_x:
        ax.scatter(initial_x, initial_y, s=46, marker="s", color=INITIAL, label="initial", zorder=3)
    if full_x:
        ax.scatter(full_x, full_y, s=34, color=CANDIDATE, alpha=0.8, label="candidate", zorder=3)
    if early_x:
        ax.scatter(
            early_x,
            early_y,
            s=30,
            facecolors="none",
            edgecolors=CANDIDATE,
            alpha=0.8,
            label="rejected early (train subset)",
            zorder=3,
        )
    curve = report.best_so_far
    if curve:
        xs = [p.step for p in curve] + [max(steps) + 0.4]
        ys = [p.score for p in curve] + [curve[-1].score]
        ax.step(xs, ys, where="post", color=BEST, linewidth=2.2, label="best so far", zorder=2)
    if winner_xy is not None:
        ax.scatter(
            [winner_xy[0]],
            [winner_xy[1]],
            s=260,
            marker="*",
            color=WINNER,
            edgecolors="white",
            linewidths=0.8,
            label="winner (chosen on validation)",
            zorder=4,
        )
    ax.set_xticks(list(steps), [("initial" if s == 0 else str(s)) for s in steps])
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    _score_limits(ax, [i.train.mean for i in scored if i.train is not None])
    ax.set_xlabel("step", color=INK)
    ax.set_ylabel("train score (mean)", color=INK)
    ax.set_title(f"{report.task}: train score of every candidate", color=INK, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    return _png(fig)


def _interval_rows(
    ax: Axes,
    rows: Sequence[tuple[str, float, float, float, str]],
) -> None:
    """Horizontal intervals, first row on top: (label, mean, low, high, colour)."""
    ys = list(range(len(rows)))[::-1]
    for y, (_, mean, low, high, colour) in zip(ys, rows, strict=True):
        ax.plot([low, high], [y, y], color=colour, linewidth=2.4, solid_capstyle="round")
        ax.scatter([mean], [y], s=46, color=colour, zorder=3)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8.5)
    ax.set_ylim(-0.7, len(rows) - 0.3)


def finalists_chart(report: RunReport) -> bytes | None:
    """Validation score of each finalist with its 95% interval."""
    finalists = [f for f in report.finalists if f.validation is not None]
    if not finalists:
        return None
    fig = _figure(9.5, 1.1 + 0.42 * len(finalists))
    ax = fig.add_subplot()
    _style(ax)
    rows = []
    for f in finalists:
        assert f.validation is not None
        colour = WINNER if f.text == report.winner else CANDIDATE
        tag = "\u2605 " if f.text == report.winner else ""
        v = f.validation
        rows.append((tag + label(f.text, 70), v.mean, v.low, v.high, colour))
    _interval_rows(ax, rows)
    if all(r[2] >= 0.0 and r[3] <= 1.0 for r in rows):
        ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("validation score (mean, 95% interval)", color=INK)
    ax.set_title("Finalists on validation (★ winner)", color=INK, loc="left")
    return _png(fig)


def lineage_chart(report: RunReport) -> bytes | None:
    """Which instruction each one was derived from, at its step and train score."""
    if not report.has_lineage:
        return None
    placed = {i.key: i for i in report.instructions if i.train is not None}
    if not placed:
        return None
    fig = _figure(9.5, 4.4)
    ax = fig.add_subplot()
    _style(ax)
    by_step: dict[int, list[InstructionStats]] = {}
    for item in placed.values():
        by_step.setdefault(item.step, []).append(item)
    position: dict[str, tuple[float, float]] = {}
    for step, items in by_step.items():
        for n, item in enumerate(items):
            x = step + (0.0 if len(items) == 1 else 0.5 * (n / (len(items) - 1) - 0.5))
            assert item.train is not None
            position[item.key] = (x, item.train.mean)
    for item in placed.values():
        if item.parent in position:
            ax.annotate(
                "",
                xy=position[item.key],
                xytext=position[item.parent],
                arrowprops={"arrowstyle": "->", "color": "#9aa5b1", "linewidth": 1.0},
                zorder=1,
            )
    kinds = sorted({i.kind for i in placed.values()}, key=lambda k: (k != "initial", k))
    for kind in kinds:
        items = [i for i in placed.values() if i.kind == kind]
        colour = KIND_COLOURS.get(kind, RUN_COLOURS[len(kind) % len(RUN_COLOURS)])
        ax.scatter(
            [position[i.key][0] for i in items],
            [position[i.key][1] for i in items],
            s=[46 if i.fully_scored else 22 for i in items],
            color=colour,
            label=kind,
            zorder=3,
        )
    winner = report.winner_stats()
    if winner is not None and winner.key in position:
        ax.scatter(
            [position[winner.key][0]],
            [position[winner.key][1]],
            s=260,
            marker="*",
            color=WINNER,
            edgecolors="white",
            label="winner",
            zorder=4,
        )
    steps = sorted(by_step)
    ax.set_xticks(steps, [("initial" if s == 0 else str(s)) for s in steps])
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    _score_limits(ax, [p[1] for p in position.values()])
    ax.set_xlabel("step", color=INK)
    ax.set_ylabel("train score (mean)", color=INK)
    ax.set_title(
        "Lineage: arrows run from an instruction to one derived from it", color=INK, loc="left"
    )
    ax.legend(
        title="kind of call",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8.5,
        frameon=False,
    )
    return _png(fig)


def test_chart(report: RunReport) -> bytes | None:
    """Winner and baselines on test with intervals; below, the paired gain over each."""
    if not report.comparisons:
        return None
    head = report.comparisons[0]
    n = len(report.comparisons)
    fig = _figure(9.5, 2.2 + 0.42 * (1 + n) + 0.42 * n)
    top, bottom = fig.subplots(2, 1, height_ratios=(1 + n + 0.8, n + 0.8))
    for ax in (top, bottom):
        _style(ax)
    winner = head.winner_test
    rows = [("\u2605 " + label(head.winner, 70), winner.mean, winner.low, winner.high, WINNER)]
    rows += [
        (
            label(c.baseline, 70),
            c.baseline_test.mean,
            c.baseline_test.low,
            c.baseline_test.high,
            INITIAL,
        )
        for c in report.comparisons
    ]
    _interval_rows(top, rows)
    if all(r[2] >= 0 and r[3] <= 1 for r in rows):
        top.set_xlim(-0.02, 1.02)
    top.set_xlabel("test score (mean, 95% interval)", color=INK)
    top.set_title("Winner (\u2605) and starting instructions on test", color=INK, loc="left")
    gains = [
        (
            "vs " + label(c.baseline, 67),
            c.paired.gain,
            c.paired.low,
            c.paired.high,
            WINNER if c.paired.significant() else CANDIDATE,
        )
        for c in report.comparisons
    ]
    _interval_rows(bottom, gains)
    bottom.axvline(0.0, color=INK, linewidth=0.9, linestyle="--")
    bottom.set_xlabel("winner \u2212 baseline on the same questions (95% interval)", color=INK)
    bottom.set_title("Paired gain (red: distinguishable from noise)", color=INK, loc="left")
    return _png(fig)


def usage_chart(report: RunReport) -> bytes | None:
    """Calls (paid and cached) and paid tokens by phase, stacked by role."""
    if not report.usage:
        return None
    phases = [p for p in PHASES if any(u.phase == p for u in report.usage)]
    fig = _figure(9.5, 3.4)
    calls_ax, tokens_ax = fig.subplots(1, 2)
    xs = list(range(len(phases)))
    bottoms_calls = [0.0] * len(phases)
    bottoms_tokens = [0.0] * len(phases)
    for role in ROLES:
        mine = {u.phase: u for u in report.usage if u.role == role}
        if not mine:
            continue
        paid = [float(mine[p].calls) if p in mine else 0.0 for p in phases]
        cached = [float(mine[p].cached) if p in mine else 0.0 for p in phases]
        tokens = [float(mine[p].tokens) if p in mine else 0.0 for p in phases]
        colour = ROLE_COLOURS[role]
        calls_ax.bar(xs, paid, bottom=bottoms_calls, color=colour, label=f"{role} (paid)")
        bottoms_calls = [b + v for b, v in zip(bottoms_calls, paid, strict=True)]
        if any(cached):
            calls_ax.bar(
                xs,
                cached,
                bottom=bottoms_calls,
                color=colour,
                alpha=0.35,
                label=f"{role} (from cache)",
            )
            bottoms_calls = [b + v for b, v in zip(bottoms_calls, cached, strict=True)]
        tokens_ax.bar(xs, tokens, bottom=bottoms_tokens, color=colour, label=role)
        bottoms_tokens = [b + v for b, v in zip(bottoms_tokens, tokens, strict=True)]
    for ax, title in ((calls_ax, "Calls by phase"), (tokens_ax, "Paid tokens by phase")):
        _style(ax)
        ax.set_xticks(xs, phases)
        ax.set_title(title, color=INK, loc="left")
        ax.legend(fontsize=8, frameon=False)
    return _png(fig)


# -- several runs ---------------------------------------------------------------------------------


def _run_label(row_strategy: str, seed: object, run_id: str) -> str:
    return f"{row_strategy} seed {seed} ({run_id[-6:]})"


def comparison_curves(comparison: RunsComparison) -> bytes | None:
    """The best-so-far train curves of every run, overlaid."""
    rows = [r for r in comparison.rows if r.curve]
    if not rows:
        return None
    fig = _figure(9.5, 4.2)
    ax = fig.add_subplot()
    _style(ax)
    handles = []
    last = max(p.step for r in rows for p in r.curve)
    values = []
    for n, row in enumerate(rows):
        colour = RUN_COLOURS[n % len(RUN_COLOURS)]
        xs = [p.step for p in row.curve] + [last + 0.4]
        ys = [p.score for p in row.curve] + [row.curve[-1].score]
        values += ys
        ax.step(xs, ys, where="post", color=colour, linewidth=2.0, alpha=0.9)
        ax.scatter([p.step for p in row.curve], [p.score for p in row.curve], s=18, color=colour)
        handles.append(
            Line2D(
                [],
                [],
                color=colour,
                linewidth=2.0,
                label=_run_label(row.strategy, row.seed, row.run_id),
            )
        )
    ax.set_xlim(-0.5, last + 0.5)
    ax.set_xticks(range(0, last + 1))
    _score_limits(ax, values)
    ax.set_xlabel("step", color=INK)
    ax.set_ylabel("best train score so far", color=INK)
    ax.set_title("Best-so-far train score, every run", color=INK, loc="left")
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False
    )
    return _png(fig)


def comparison_scores(comparison: RunsComparison) -> bytes | None:
    """Each run's test score with its interval, and its best baseline's."""
    rows = [r for r in comparison.rows if r.test is not None]
    if not rows:
        return None
    fig = _figure(9.5, 1.2 + 0.45 * len(rows))
    ax = fig.add_subplot()
    _style(ax)
    ys = list(range(len(rows)))[::-1]
    for y, (n, row) in zip(ys, enumerate(rows), strict=True):
        assert row.test is not None
        colour = RUN_COLOURS[n % len(RUN_COLOURS)]
        ax.plot(
            [row.test.low, row.test.high],
            [y, y],
            color=colour,
            linewidth=2.4,
            solid_capstyle="round",
        )
        ax.scatter([row.test.mean], [y], s=50, color=colour, zorder=3)
        if row.baseline_test is not None:
            ax.scatter(
                [row.baseline_test], [y], s=46, marker="|", color=INK, zorder=4, linewidths=2
            )
    ax.set_yticks(ys, [_run_label(r.strategy, r.seed, r.run_id) for r in rows], fontsize=8.5)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("test score of the winner (mean, 95% interval); | = best baseline", color=INK)
    ax.set_title("Test score, every run", color=INK, loc="left")
    return _png(fig)
