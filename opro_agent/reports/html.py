"""Self-contained HTML: one file with inline CSS and the charts as inline PNG data, no script,
no font, no request of any kind (a Content-Security-Policy says so to the browser), so it
opens offline, from a mail attachment or a CI artifact alike. Every text from a run is escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from opro_agent.reports import charts
from opro_agent.reports.comparison import RunsComparison
from opro_agent.reports.data import (
    PHASES,
    ExampleChange,
    InstructionStats,
    RunReport,
    TestComparison,
)
from opro_agent.stats import Interval

__all__ = ["RenderedReport", "render_comparison", "render_report"]

TOP_INSTRUCTIONS = 10
MAX_EXAMPLES = 25  # fixed and broken examples listed per comparison
NONE = "&ndash;"  # a missing figure
SHOWN_SETTINGS = ("steps", "patience", "target_score", "validate_top", "seed")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # nothing but inline

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9dee3; --soft: #f5f7fa;
        --good: #1e7b45; --bad: #b03a2e; --accent: #c0392b; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 6px 0; }
.meta { color: var(--muted); font-size: 13.5px; }
nav { font-size: 13.5px; margin: 10px 0 0; }
nav a { color: var(--ink); margin-right: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr));
         gap: 12px; margin: 18px 0 8px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
        padding: 10px 14px; }
.card .k { color: var(--muted); font-size: 12.5px; text-transform: uppercase;
           letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; }
.card .ci { color: var(--muted); font-size: 12.5px; }
blockquote.ins { margin: 8px 0; padding: 10px 14px; background: #fff8f0;
                 border-left: 4px solid var(--accent); white-space: pre-wrap;
                 overflow-wrap: anywhere; }
.verdict { padding: 8px 12px; border-radius: 6px; background: var(--soft); }
.verdict.sig { background: #e8f5ee; }
img.chart { display: block; max-width: 100%; height: auto; margin: 10px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin: 8px 0; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px;
         border-bottom: 1px solid var(--line); }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, th.num, td.keep, th.keep { white-space: nowrap; width: 1%; }
td.text { white-space: pre-wrap; overflow-wrap: anywhere; }
td.ins { width: 46%; min-width: 260px; }
tr.winner td { background: #fff3ef; }
.child { margin: 0 0 6px; }
.child:last-child { margin: 0; }
.ok { color: var(--good); } .bad { color: var(--bad); }
.ci { color: var(--muted); font-size: 12px; }
td.num .ci { display: block; }
code { font-size: 13px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
"""


@dataclass(frozen=True)
class RenderedReport:
    html: str
    main_chart: bytes | None  # the search chart as PNG (also inside the HTML)


# -- helpers ---------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _num(value: float | None, digits: int = 3) -> str:
    return NONE if value is None else f"{value:.{digits}f}"


def _ci(value: Interval | None, *, n: bool = True) -> str:
    if value is None:
        return NONE
    text = f"{value.mean:.3f}"
    if value.n > 1:
        text += f' <span class="ci">[{value.low:.3f}, {value.high:.3f}]'
        text += f" n={value.n}</span>" if n else "</span>"
    return text


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _cost(value: float | None) -> str:
    if value is None:
        return NONE
    return "$0" if value == 0 else f"${value:.4f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return NONE
    if value < 120:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], kinds: str) -> str:
    """An HTML table; `kinds` has one letter per column: t text, i instruction (a wide
    text column), k short text kept on one line, n number (right-aligned)."""
    classes = {"t": "text", "i": "text ins", "k": "keep", "n": "num"}
    head = "".join(
        f'<th class="{classes[k]}">{_e(h)}</th>' for h, k in zip(headers, kinds, strict=True)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{classes[k]}">{c}</td>' for c, k in zip(row, kinds, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _card(key: str, value: str, detail: str = "") -> str:
    extra = f'<div class="ci">{detail}</div>' if detail else ""
    return (
        f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{value}</div>{extra}</div>'
    )


def _version() -> str:
    try:
        return version("opro-agent")
    except PackageNotFoundError:
        return "dev"


def _page(title: str, body: str) -> str:
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
{body}
<footer>Made by opro-agent {_e(_version())} on {_e(generated)}. A single file: no scripts, no
fonts, no network.</footer>
</main>
</body>
</html>
"""


def _search_settings(settings: Mapping[str, object]) -> dict[str, object]:
    """The search settings that shape a run (not retries, concurrency or thresholds)."""
    shown = {k: settings.get(k) for k in SHOWN_SETTINGS}
    budget = settings.get("budget")
    if isinstance(budget, Mapping):
        shown.update({k: v for k, v in budget.items() if v is not None})
    return shown


def _settings_text(values: Mapping[str, object]) -> str:
    shown = {k: v for k, v in values.items() if v not in (None, {}, [])}
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in shown.items())


# -- one run ---------------------------------------------------------------------------------------


def render_report(report: RunReport) -> RenderedReport:
    """The report of one run as one HTML page, and its main chart as PNG."""
    main_chart = charts.search_chart(report)
    sections = [
        _header(report),
        _search_section(report, main_chart),
        _finalists_section(report),
        _lineage_section(report),
        _top_section(report),
        _test_section(report),
        _spending_section(report),
    ]
    title = f"opro-agent report: {report.task} ({report.run_id})"
    return RenderedReport(_page(title, "\n".join(sections)), main_chart)


def _header(report: RunReport) -> str:
    created = datetime.datetime.fromtimestamp(report.created_at).strftime("%Y-%m-%d %H:%M")
    models = ", ".join(f"{role} {_e(spec)}" for role, spec in report.models.items())
    meta = [
        f"run <code>{_e(report.run_id)}</code>",
        f"strategy <b>{_e(report.strategy)}</b>",
        f"status {_e(report.status)}",
    ]
    if report.stop_reason:
        meta.append(f"stopped on {_e(report.stop_reason)}")
    meta.append(f"created {_e(created)}")
    if models:
        meta.append(models)
    settings = _settings_text(report.strategy_settings)
    search = _settings_text(_search_settings(report.settings))
    nav = "".join(
        f'<a href="#{anchor}">{name}</a>'
        for anchor, name in (
            ("search", "Search"),
            ("finalists", "Finalists"),
            ("lineage", "Lineage"),
            ("top", "Top instructions"),
            ("test", "Test"),
            ("spending", "Spending"),
        )
    )
    parts = [
        f"<h1>{_e(report.task)}</h1>",
        f'<p class="meta">{" · ".join(meta)}</p>',
        f'<p class="meta">{_e(report.strategy)} settings: {_e(settings)}</p>' if settings else "",
        f'<p class="meta">search settings: {_e(search)}</p>' if search else "",
        f"<nav>{nav}</nav>",
    ]
    winner = report.winner_stats()
    if report.winner is None:
        parts.append(
            f'<p class="verdict">This run has no result yet (status {_e(report.status)}): '
            "the charts show what it stored so far.</p>"
        )
        return "\n".join(parts)
    parts.append("<h2>Best instruction</h2>")
    parts.append(f'<blockquote class="ins">{_e(report.winner)}</blockquote>')
    head = report.headline()
    cards = [
        _card(
            "train",
            _num(winner.train.mean if winner and winner.train else None),
            _interval_detail(winner.train if winner else None),
        ),
        _card(
            "validation",
            _num(winner.validation.mean if winner and winner.validation else None),
            _interval_detail(winner.validation if winner else None),
        ),
        _card(
            "test",
            _num(head.winner_test.mean if head else None),
            _interval_detail(head.winner_test if head else None),
        ),
    ]
    if head is not None:
        gain = head.paired
        cards.append(
            _card(
                "baseline on test",
                _num(head.baseline_test.mean),
                _interval_detail(head.baseline_test),
            )
        )
        cards.append(
            _card(
                "gain on test",
                f"{gain.gain:+.3f}",
                f"[{gain.low:+.3f}, {gain.high:+.3f}] · {_p(gain.p_value)} ({_e(gain.method)})",
            )
        )
    totals = report.totals()
    cards.append(
        _card(
            "spent",
            f"{totals.calls} calls",
            f"{totals.tokens:,} tokens · {_cost(totals.cost)} · {_seconds(report.session_seconds)}",
        )
    )
    parts.append(f'<div class="cards">{"".join(cards)}</div>')
    verdict = report.verdict()
    if verdict and head is not None:
        cls = "verdict sig" if head.paired.significant() else "verdict"
        parts.append(f'<p class="{cls}">Against the best starting instruction: {_e(verdict)}.</p>')
    selection = report.selection
    if isinstance(selection, Mapping) and selection.get("reason"):
        parts.append(f'<p class="meta">Selection: {_e(selection["reason"])}</p>')
    return "\n".join(parts)


def _interval_detail(value: Interval | None) -> str:
    if value is None or value.n <= 1:
        return ""
    return f"95% [{value.low:.3f}, {value.high:.3f}] · n={value.n} · {_e(value.method)}"


def _search_section(report: RunReport, chart: bytes | None) -> str:
    fully = sum(1 for i in report.instructions if i.fully_scored)
    early = sum(1 for i in report.instructions if i.train is not None and not i.fully_scored)
    text = (
        f"{len(report.instructions)} instructions over {len(report.steps)} steps "
        f"(step 0 holds the starting instructions); {fully} scored on all "
        f"{report.train_size} training questions"
    )
    if early:
        text += f", {early} stopped early on a subset by racing (hollow)"
    parts = ['<h2 id="search">Search</h2>', f"<p>{_e(text)}.</p>"]
    parts.append(_img(chart, "train score of every candidate per step, best so far"))
    # The steps where the best train score rose (and where it started).
    records = [
        p
        for n, p in enumerate(report.best_so_far)
        if n == 0 or p.score > report.best_so_far[n - 1].score
    ]
    if records:
        rows = [(str(p.step), _num(p.score), _e(p.instruction)) for p in records]
        parts.append("<h3>New best on train, by step</h3>")
        parts.append(_table(("step", "train", "instruction"), rows, "nnt"))
    return "\n".join(parts)


def _finalists_section(report: RunReport) -> str:
    parts = ['<h2 id="finalists">Finalists on validation</h2>']
    if not report.finalists:
        parts.append("<p>No instruction was scored on validation.</p>")
        return "\n".join(parts)
    parts.append(
        "<p>The best instructions on train were scored on the validation split; the best "
        "there won. Intervals are 95%.</p>"
    )
    parts.append(_img(charts.finalists_chart(report), "validation score of each finalist"))
    rows = [
        (
            ("★ " if f.text == report.winner else "") + _e(f.text),
            str(f.step),
            _ci(f.train, n=False),
            _ci(f.validation),
        )
        for f in report.finalists
    ]
    parts.append(_table(("instruction", "step", "train", "validation"), rows, "innn"))
    return "\n".join(parts)


def _lineage_section(report: RunReport) -> str:
    parts = ['<h2 id="lineage">Lineage</h2>']
    if not report.has_lineage:
        parts.append(
            f"<p>The {_e(report.strategy)} strategy records no parents: every proposal is "
            "written from the scores of everything tried so far.</p>"
        )
        return "\n".join(parts)
    parts.append(
        "<p>Each instruction at its step and train score; big dots were scored on the whole "
        "train split, small ones stopped early on a subset.</p>"
    )
    parts.append(_img(charts.lineage_chart(report), "lineage of instructions"))
    children: dict[str, list[InstructionStats]] = {}
    for item in report.instructions:
        if item.parent is not None:
            children.setdefault(item.parent, []).append(item)
    rows = []
    for parent_key, derived in children.items():
        parent = report.instruction(parent_key)
        rows.append(
            (
                _e(parent.text) if parent else f"<code>{_e(parent_key)}</code>",
                _num(parent.train.mean if parent and parent.train else None),
                "".join(
                    f'<div class="child">{_e(d.kind)} at step {d.step}, train '
                    f"{_num(d.train.mean if d.train else None)}"
                    f"{'' if d.fully_scored else ' (subset)'}: {_e(d.text)}</div>"
                    for d in derived
                ),
            )
        )
    parts.append(_table(("instruction", "train", "derived from it"), rows, "int"))
    return "\n".join(parts)


def _top_section(report: RunReport) -> str:
    top = report.top(TOP_INSTRUCTIONS)
    parts = [
        '<h2 id="top">Top instructions</h2>',
        "<p>Ranked by validation score where measured, then by train score; 95% intervals "
        "(Wilson for 0/1 scores, bootstrap otherwise).</p>",
    ]
    rows = [_top_row(report, i) for i in top]
    headers = ("instruction", "step", "kind", "train", "validation", "test")
    table = _table(headers, rows, "inknnn")
    # Mark the winner's row.
    if report.winner is not None and top and top[0].text == report.winner:
        table = table.replace("<tbody><tr>", '<tbody><tr class="winner">', 1)
    parts.append(table)
    return "\n".join(parts)


def _top_row(report: RunReport, item: InstructionStats) -> tuple[str, ...]:
    star = "★ " if item.text == report.winner else ""
    partial = "" if item.fully_scored or item.train is None else " (subset)"
    return (
        star + _e(item.text),
        str(item.step),
        _e(item.kind),
        _ci(item.train) + partial,
        _ci(item.validation),
        _ci(item.test),
    )


def _test_section(report: RunReport) -> str:
    parts = ['<h2 id="test">Winner against baseline on test</h2>']
    if not report.comparisons:
        parts.append(
            "<p>The test split was not scored (the run has not finished, or the task "
            "has no test split).</p>"
        )
        return "\n".join(parts)
    parts.append(
        "<p>The winner and each starting instruction answered the same test questions; the "
        "test compares them question by question (exact McNemar for 0/1 scores, a paired "
        "randomization test otherwise).</p>"
    )
    parts.append(_img(charts.test_chart(report), "winner and baselines on test"))
    rows = [
        (
            _e(c.baseline),
            _ci(c.baseline_test, n=False),
            _ci(c.winner_test, n=False),
            f'{c.paired.gain:+.3f} <span class="ci">[{c.paired.low:+.3f}, '
            f"{c.paired.high:+.3f}]</span>",
            _e(_p(c.paired.p_value)),
            f"{len(c.paired.fixed)} / {len(c.paired.broken)}",
            str(c.paired.n),
        )
        for c in report.comparisons
    ]
    parts.append(
        _table(
            ("baseline", "baseline test", "winner test", "gain", "p", "fixed / broken", "n"),
            rows,
            "innnnnn",
        )
    )
    for comparison in report.comparisons:
        parts.append(_changes(comparison, report.task_found))
    return "\n".join(parts)


def _changes(c: TestComparison, task_found: bool) -> str:
    if c.same_instruction:
        return (
            f"<p>The winner is the starting instruction {_e(repr(c.baseline))}: "
            "the search kept it, nothing to compare.</p>"
        )
    parts = [
        f"<h3>Fixed and broken against {_e(repr(c.baseline))}</h3>",
        f'<p class="verdict">{_e(c.verdict[0].upper() + c.verdict[1:])}.</p>',
    ]
    if not task_found:
        parts.append(
            '<p class="meta">The task file was not at hand: questions are shown by example id.</p>'
        )
    for title, items, cls in (("fixed", c.fixed, "ok"), ("broken", c.broken, "bad")):
        if not items:
            parts.append(f"<p>No {title} example.</p>")
            continue
        shown = items[:MAX_EXAMPLES]
        more = f" (first {len(shown)} of {len(items)})" if len(items) > len(shown) else ""
        parts.append(f'<p><b class="{cls}">{len(items)} {title}</b>{_e(more)}</p>')
        parts.append(
            _table(
                ("id", "question", "answer", "baseline said", "winner said"),
                [_change_row(x) for x in shown],
                "ktktt",
            )
        )
    return "\n".join(parts)


def _change_row(change: ExampleChange) -> tuple[str, ...]:
    return (
        _e(change.example_id),
        NONE if change.question is None else _e(change.question),
        NONE if change.target is None else _e(change.target),
        NONE if change.baseline_answer is None else _e(change.baseline_answer),
        NONE if change.winner_answer is None else _e(change.winner_answer),
    )


def _spending_section(report: RunReport) -> str:
    parts = ['<h2 id="spending">Calls, tokens, cost and time</h2>']
    if not report.usage:
        parts.append("<p>No call was recorded.</p>")
        return "\n".join(parts)
    parts.append(
        "<p>Paid calls (failed attempts included) and calls answered from the response cache, "
        "by role and phase. Cost is at the built-in list prices. Scorer seconds add up each "
        "call's latency; calls run concurrently, so they exceed the wall-clock time.</p>"
    )
    parts.append(_img(charts.usage_chart(report), "calls and tokens by phase and role"))
    rows = [
        (
            _e(u.role),
            _e(u.phase),
            str(u.calls),
            str(u.cached),
            str(u.failed),
            f"{u.prompt_tokens:,}",
            f"{u.completion_tokens:,}",
            _cost(u.cost),
            _seconds(u.call_seconds),
        )
        for u in [*report.usage, report.totals()]
    ]
    headers = (
        "role",
        "phase",
        "calls",
        "cached",
        "failed",
        "prompt tokens",
        "completion tokens",
        "cost",
        "call seconds",
    )
    parts.append(_table(headers, rows, "kknnnnnnn"))
    if report.phase_times:
        times = {t.phase: t.seconds for t in report.phase_times}
        parts.append("<h3>Wall-clock time by phase</h3>")
        parts.append(
            _table(
                [p for p in PHASES if p in times] + ["sessions"],
                [
                    [_seconds(times[p]) for p in PHASES if p in times]
                    + [_seconds(report.session_seconds)]
                ],
                "n" * (len(times) + 1),
            )
        )
    return "\n".join(parts)


# -- several runs ----------------------------------------------------------------------------------


def render_comparison(comparison: RunsComparison) -> str:
    """Several runs: one table and their curves overlaid, as one HTML page."""
    tasks = ", ".join(comparison.tasks)
    parts = [
        f"<h1>Runs compared: {_e(tasks)}</h1>",
        f'<p class="meta">{len(comparison.rows)} runs. Scores are the winner\'s, with 95% '
        "intervals; the gain is paired against the run's best starting instruction on test."
        "</p>",
        "<h2>Runs</h2>",
    ]
    rows = [
        (
            f"<code>{_e(r.run_id)}</code>",
            _e(r.strategy),
            NONE if r.seed is None else _e(r.seed),
            _e(r.stop_reason or r.status),
            _ci(r.validation, n=False),
            _ci(r.test, n=False),
            _num(r.baseline_test),
            NONE
            if r.gain is None
            else f"{r.gain:+.3f}"
            + ("" if r.p_value is None else f' <span class="ci">{_e(_p(r.p_value))}</span>'),
            str(r.calls),
            f"{r.tokens:,}",
            _cost(r.cost),
            _seconds(r.seconds),
        )
        for r in comparison.rows
    ]
    headers = (
        "run",
        "strategy",
        "seed",
        "stop",
        "validation",
        "test",
        "baseline",
        "gain",
        "calls",
        "tokens",
        "cost",
        "time",
    )
    parts.append(_table(headers, rows, "kknknnnnnnnn"))
    parts.append(_img(charts.comparison_curves(comparison), "best-so-far train score per run"))
    parts.append(_img(charts.comparison_scores(comparison), "test score per run"))
    parts.append("<h2>Best instruction of each run</h2>")
    parts.append(
        _table(
            ("run", "best instruction"),
            [
                (
                    f"<code>{_e(r.run_id)}</code>",
                    NONE if r.best_instruction is None else _e(r.best_instruction),
                )
                for r in comparison.rows
            ],
            "kt",
        )
    )
    return _page(f"opro-agent: runs compared ({tasks})", "\n".join(parts))
