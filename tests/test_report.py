"""Run reports: the data computed from the store, the self-contained HTML, and the CLI's
`report` and `runs compare` (scripted runs; the browser test is tests/test_report_browser.py)."""

from __future__ import annotations

import base64
import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage

from opro_agent import Ape, OproOptimizer, RunStore, SearchSettings, SplitSpec, Task
from opro_agent.candidates import instruction_key
from opro_agent.cli import main
from opro_agent.reports import RunReport, RunsComparison
from opro_agent.reports.data import PHASES
from opro_agent.reports.html import render_comparison, render_report
from opro_agent.result import OptimizationResult
from tests.conftest import FACTS, FAST_OPRO, FAST_RETRY, optimizer_reply, scorer_reply
from tests.fakes import ScriptedChatModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# An initial instruction a careless report would turn into markup.
HOSTILE = "<script>alert('x')</script> Think & answer: <b>now</b>"


def ape_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    """APE's optimizer, scripted: induced instructions, then variations of the best."""
    kind, idx, step = metadata["opro_kind"], metadata["opro_candidate"], metadata["opro_step"]
    if kind == "resample":
        if idx % 2:
            return f"<INS>Say whatever comes to mind, variation {step}.{idx}.</INS>"
        return f"<INS>Reply yes or no, variation {step}.{idx}.</INS>"
    if kind == "forward":
        return "think about the number first." if idx else "answer the question with yes or no."
    return "<INS>Think about it.</INS>"


def make_task(*, hostile: bool = False) -> Task:
    initial = (HOSTILE,) if hostile else ("Let's solve the problem.",)
    return Task.from_records(
        "even_numbers",
        [{"input": q, "target": a} for q, a in FACTS],
        metric="boolean",
        instruction_position="Q_begin",
        split=SplitSpec(train=20, validation=10, test=30, seed=1),
        initial_instructions=initial,
    )


def opro_run(store: RunStore, task: Task, *, seed: int = 0) -> OptimizationResult:
    return OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        settings=SearchSettings(steps=3, concurrency=4, retry=FAST_RETRY, seed=seed),
        store=store,
    ).invoke(task)


def ape_run(store: RunStore, task: Task) -> OptimizationResult:
    return OproOptimizer(
        ScriptedChatModel(respond=ape_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=Ape(proposals=4, demos=3, resample_top=2, variations=2),
        settings=SearchSettings(steps=3, concurrency=4, retry=FAST_RETRY),
        store=store,
    ).invoke(task)


@dataclass(frozen=True)
class Runs:
    run_dir: Path
    task: Task
    opro: OptimizationResult
    opro_seed_1: OptimizationResult
    ape: OptimizationResult


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Three scripted runs in one store: OPRO (seeds 0 and 1) and APE (with lineage)."""
    run_dir = tmp_path_factory.mktemp("report-runs")
    task = make_task(hostile=True)
    store = RunStore.open(run_dir)
    made = Runs(
        run_dir,
        task,
        opro_run(store, task),
        opro_run(store, task, seed=1),
        ape_run(store, make_task()),
    )
    store.close()
    return made


@pytest.fixture
def store(runs: Runs) -> RunStore:
    return RunStore.open(runs.run_dir)


# -- the data ------------------------------------------------------------------------------------


def test_report_data_agrees_with_the_run(runs: Runs, store: RunStore) -> None:
    result = runs.opro
    report = RunReport.from_store(store, result.run_id[:17])  # a unique prefix will do

    assert report.run_id == result.run_id and report.strategy == "opro"
    assert report.status == "done" and report.stop_reason == result.stop_reason
    assert report.winner == result.best_instruction
    # Every instruction, with the same train / validation / test means as the history.
    assert [i.text for i in report.instructions] == [h.instruction for h in result.history]
    for item, entry in zip(report.instructions, result.history, strict=True):
        for split in ("train", "validation", "test"):
            ours, theirs = getattr(item, split), getattr(entry, split)
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert ours.mean == pytest.approx(theirs)
                assert ours.low <= ours.mean <= ours.high
    # The best-so-far curve never falls and ends at the best fully scored train score.
    scores = [p.score for p in report.best_so_far]
    assert scores == sorted(scores)
    assert scores[-1] == max(
        i.train.mean for i in report.instructions if i.train and i.fully_scored
    )
    assert [p.step for p in report.best_so_far] == list(report.steps)
    # Finalists: scored on validation, best first; the winner among them.
    assert report.finalists and all(f.validation is not None for f in report.finalists)
    assert result.best_instruction in {f.text for f in report.finalists}
    # Winner against the initial instruction on test: the paired test of the summary.
    head = report.headline()
    assert head is not None and head.baseline == HOSTILE
    assert head.paired.gain == pytest.approx(result.test_gain)
    summary = store.get_run(result.run_id).summary or {}
    stored = summary.get("test_comparison")
    if stored:
        assert list(head.paired.fixed) == stored["fixed"]
        assert list(head.paired.broken) == stored["broken"]
        assert report.verdict() == stored["verdict"]
    assert [c.example_id for c in head.fixed] == sorted(head.paired.fixed, key=int)
    # Calls and tokens by role and phase add up to the run's own totals.
    totals = report.totals()
    assert totals.calls == result.calls["optimizer"] + result.calls["scorer"]
    assert totals.prompt_tokens == result.tokens["prompt"]
    assert totals.completion_tokens == result.tokens["completion"]
    by_role = {
        role: sum(u.calls for u in report.usage if u.role == role)
        for role in ("optimizer", "scorer")
    }
    assert by_role == dict(result.calls)
    assert {u.phase for u in report.usage if u.role == "scorer"} == set(PHASES)
    assert {t.phase for t in report.phase_times} <= set(PHASES)
    assert all(t.seconds >= 0 for t in report.phase_times)
    assert report.top(3)[0].text == result.best_instruction


def test_fixed_and_broken_examples_show_questions_when_the_task_is_known(
    runs: Runs, store: RunStore
) -> None:
    bare = RunReport.from_store(store, runs.opro.run_id)
    assert not bare.task_found  # made in Python: no task file to read back
    known = RunReport.from_store(store, runs.opro.run_id, task=runs.task)
    head = known.headline()
    assert head is not None and head.fixed
    questions = {str(i): q for i, (q, _) in enumerate(FACTS)}
    for change in head.fixed:
        assert change.question == questions[change.example_id]
        assert change.winner_score > change.baseline_score
        assert change.winner_answer is not None


def test_ape_lineage_links_each_variation_to_its_parent(runs: Runs, store: RunStore) -> None:
    report = RunReport.from_store(store, runs.ape.run_id)
    assert report.strategy == "ape" and report.has_lineage
    derived = [i for i in report.instructions if i.parent is not None]
    assert derived and {i.kind for i in derived} == {"resample"}
    for item in derived:
        parent = report.instruction(item.parent or "")
        assert parent is not None and parent.step < item.step
    # Racing stops some candidates on a subset of the train split.
    assert any(i.train is not None and not i.fully_scored for i in report.instructions)
    assert not RunReport.from_store(store, runs.opro.run_id).has_lineage


def test_a_run_without_results_still_reports(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path)
    run_id = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        store=store,
    ).prepare_run(make_task())
    report = RunReport.from_store(store, run_id)
    assert report.winner is None and report.instructions == () and report.comparisons == ()
    rendered = render_report(report)
    assert rendered.main_chart is None
    assert "no result yet" in rendered.html


def test_a_store_in_memory_cannot_be_reported() -> None:
    from opro_agent.errors import RunStoreError

    store = RunStore(":memory:")
    run_id = store.create_run("t", {})
    with pytest.raises(RunStoreError, match="on disk"):
        RunReport.from_store(store, run_id)


# -- the HTML ------------------------------------------------------------------------------------


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_html_is_self_contained_and_escapes_run_text(runs: Runs, store: RunStore) -> None:
    rendered = render_report(RunReport.from_store(store, runs.opro.run_id))
    page = rendered.html
    # Nothing to fetch: no script, no external source, and a policy that forbids requests.
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "http://" not in page and "https://" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # The hostile initial instruction is shown as text.
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Think &amp; answer" in page
    # Charts: search, finalists, test, usage (OPRO records no lineage), all real PNGs.
    images = _images(page)
    assert len(images) == 4 and all(i.startswith(PNG_MAGIC) and len(i) > 5000 for i in images)
    assert rendered.main_chart == images[0]
    for section in ("Search", "Finalists on validation", "Top instructions", "Lineage"):
        assert f">{section}</h2>" in page
    assert "records no parents" in page
    assert "Winner against baseline on test" in page and "fixed" in page


def test_ape_report_draws_the_lineage(runs: Runs, store: RunStore) -> None:
    page = render_report(RunReport.from_store(store, runs.ape.run_id)).html
    assert len(_images(page)) == 5
    assert "derived from it" in page and "resample at step" in page


def test_comparison_rows_and_html(runs: Runs, store: RunStore) -> None:
    ids = [runs.opro.run_id, runs.opro_seed_1.run_id, runs.ape.run_id]
    comparison = RunsComparison.from_store(store, ids)
    assert [r.run_id for r in comparison.rows] == ids
    assert [r.seed for r in comparison.rows] == [0, 1, 0]
    first = comparison.rows[0]
    assert first.test is not None and first.test.mean == pytest.approx(runs.opro.scores["test"])
    assert first.gain == pytest.approx(runs.opro.test_gain)
    assert first.calls == sum(runs.opro.calls.values())
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["tasks"] == ["even_numbers"]
    assert data["runs"][2]["strategy"] == "ape" and data["runs"][2]["best_so_far"]
    page = render_comparison(comparison)
    assert len(_images(page)) == 2 and "<script" not in page.lower()
    assert "&lt;script&gt;" in page or HOSTILE not in page


# -- the command line -----------------------------------------------------------------------------


def test_cli_report_writes_html_and_png(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "run.html"
    code = main(
        ["report", runs.ape.run_id, "--run-dir", str(runs.run_dir), "--out", str(out), "--png"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {out.with_suffix('.png')}" in printed
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "no-such-run"], "RUN: no run 'no-such-run'"),
        (["runs", "compare", "no-such-run", "other"], "RUN: no run 'no-such-run'"),
        (["runs", "compare", "only-one"], "RUN: give at least two runs to compare"),
    ],
)
def test_cli_report_errors_are_one_line(
    runs: Runs, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--run-dir", str(runs.run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_report_without_a_run_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "x", "--run-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "--run-dir: no run store in" in err and err.count("\n") == 1


def test_cli_report_without_the_extra(
    runs: Runs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "r.html"
    argv = ["report", runs.opro.run_id, "--run-dir", str(runs.run_dir), "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "opro-agent report needs the report extra: pip install 'opro-agent[report]'\n"
    )
    assert not out.exists()
    # JSON needs no chart, so no extra.
    ids = [runs.opro.run_id, runs.ape.run_id]
    assert main(["runs", "compare", *ids, "--run-dir", str(runs.run_dir), "--json"]) == 0


def test_cli_runs_compare(
    runs: Runs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    ids = [runs.opro.run_id, runs.opro_seed_1.run_id, runs.ape.run_id]
    assert main(["runs", "compare", *ids, "--run-dir", str(runs.run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("RUN ") and "wrote compare.html" in out
    assert all(f"best {run_id}: " in out for run_id in ids)
    assert (tmp_path / "compare.html").is_file()

    assert main(["runs", "compare", *ids[:2], "--run-dir", str(runs.run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [r["run_id"] for r in data["runs"]] == ids[:2]
    row = data["runs"][0]
    assert row["best_instruction"] == runs.opro.best_instruction
    assert set(row["test"]) == {"mean", "low", "high", "n", "method"}
    assert set(row["test_gain"]) == {"gain", "low", "high", "p_value"}


def test_report_key_of_the_winner_is_its_instruction_key(runs: Runs, store: RunStore) -> None:
    report = RunReport.from_store(store, runs.opro.run_id)
    winner = report.winner_stats()
    assert winner is not None and winner.key == instruction_key(runs.opro.best_instruction)


def test_the_readme_report_command_runs(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    command = next(b.strip() for b in blocks if "&& opro-agent report RUN" in b)
    argv = shlex.split(command.split("&& ")[-1])[1:]
    assert argv[:2] == ["report", "RUN"]
    argv[1] = runs.opro.run_id
    argv[argv.index("--run-dir") + 1] = str(runs.run_dir)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.png").is_file()
