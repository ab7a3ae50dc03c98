"""The quickstart's stage runner: stages run side by side in processes of their own, failures and resumes."""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

import pytest

from pipeline.processes import StageError
from pipeline.quickstart import Pipeline, QuickstartConfig


def _meet(out: str, me: str, other: str, side_by_side: int = 1) -> None:
    """Write ``me``'s pid and share, then wait for ``other``'s file: only stages running at once both end."""
    Path(out, f"{me}.json").write_text(json.dumps({"pid": os.getpid(), "side_by_side": side_by_side}))
    print(f"{me}: waiting for {other}", flush=True)
    deadline = time.monotonic() + 60
    while not Path(out, f"{other}.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never started")
        time.sleep(0.05)


def _alone(out: str, me: str, side_by_side: int = 1) -> None:
    Path(out, f"{me}.json").write_text(json.dumps({"pid": os.getpid(), "side_by_side": side_by_side}))


def _fail(side_by_side: int = 1) -> None:
    print("about to fail", flush=True)
    raise RuntimeError("the corpus shard broke")


def _wait_for(out: str, me: str, other: str, side_by_side: int = 1) -> None:
    """Wait for ``other``'s file, then write ``me``'s pid and share and the time."""
    deadline = time.monotonic() + 60
    while not Path(out, f"{other}.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never ran")
        time.sleep(0.05)
    time.sleep(0.5)
    Path(out, f"{me}.json").write_text(json.dumps({"pid": os.getpid(), "side_by_side": side_by_side}))
    print(f"{me}: ran after {other}", flush=True)


def _sleep_then_mark(out: str, side_by_side: int = 1) -> None:
    time.sleep(30)
    Path(out, "slow-finished").write_text("")


def _pipeline(tmp_path: Path) -> tuple[Pipeline, list[str]]:
    lines: list[str] = []
    return Pipeline(QuickstartConfig(out=str(tmp_path / "run")), log=lines.append), lines


def test_side_by_side_stages_run_at_once_in_their_own_processes(tmp_path):
    pipeline, lines = _pipeline(tmp_path)
    out, order = str(tmp_path), []
    pipeline.run({"first": lambda: order.append("first"),
                  "a": partial(_meet, out, "a", "b"), "b": partial(_meet, out, "b", "a"),
                  "last": lambda: order.append("last")}, side_by_side=(("a",), ("b",)))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["pid"] != b["pid"] and os.getpid() not in (a["pid"], b["pid"])
    assert a["side_by_side"] == b["side_by_side"] == 2
    assert order == ["first", "last"]
    seconds = json.loads((tmp_path / "run" / "stages.json").read_text())["seconds"]
    assert list(seconds) == ["first", "a", "b", "last"]  # stage order, whichever finished first
    assert [ln for ln in lines if ln.startswith("==")] == [
        "== [1/4] first", f"== [2/4] a (side by side with b; log: {tmp_path / 'run' / 'logs' / 'a.log'})",
        f"== [3/4] b (side by side with a; log: {tmp_path / 'run' / 'logs' / 'b.log'})", "== [4/4] last"]
    assert "a: waiting for b" in (tmp_path / "run" / "logs" / "a.log").read_text()


@pytest.mark.parametrize("before", [(), ("ok",)], ids=["first of its lane", "second of its lane"])
def test_a_failing_stage_names_its_log_and_stops_the_other(tmp_path, before):
    pipeline, _ = _pipeline(tmp_path)
    start = time.monotonic()
    stages = {"ok": partial(_alone, str(tmp_path), "ok")} if before else {}
    with pytest.raises(StageError, match=r"stage bad failed \(exit 1\); log: .*bad\.log; last line: RuntimeError: "
                                         r"the corpus shard broke"):
        pipeline.run({**stages, "bad": partial(_fail), "slow": partial(_sleep_then_mark, str(tmp_path))},
                     side_by_side=((*before, "bad"), ("slow",)))
    assert time.monotonic() - start < 25  # the slow one was stopped, not waited for
    time.sleep(0.5)
    assert not (tmp_path / "slow-finished").exists()
    state_file = tmp_path / "run" / "stages.json"  # only the stage before the failing one is recorded as done
    seconds = json.loads(state_file.read_text())["seconds"] if state_file.exists() else {}
    assert list(seconds) == list(before)


def test_lanes_resumed_with_one_stage_left_run_it_in_process_on_all_cores(tmp_path):
    pipeline, lines = _pipeline(tmp_path)
    pipeline.state["seconds"]["a"] = 5.0  # finished by an earlier run
    out = str(tmp_path)
    pipeline.run({"a": partial(_alone, out, "a"), "b": partial(_alone, out, "b")}, side_by_side=(("a",), ("b",)))
    assert not (tmp_path / "a.json").exists()
    assert json.loads((tmp_path / "b.json").read_text()) == {"pid": os.getpid(), "side_by_side": 1}
    assert lines[0] == "== [1/2] a: done in an earlier run (5 s), skipped" and lines[1] == "== [2/2] b"


def test_a_lane_runs_its_stages_in_turn_in_one_process_while_the_other_lane_runs(tmp_path):
    """Lane (a, c) beside lane (b): c starts when a ends and meets b, which waits for c; so c ran after a
    in a's process while b was still running."""
    pipeline, lines = _pipeline(tmp_path)
    out = str(tmp_path)
    pipeline.run({"a": partial(_alone, out, "a"), "b": partial(_wait_for, out, "b", "c"),
                  "c": partial(_wait_for, out, "c", "a"), "last": lambda: None},
                 side_by_side=(("a", "c"), ("b",)))
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert a["pid"] == c["pid"] != b["pid"] and os.getpid() not in (a["pid"], b["pid"])
    assert a["side_by_side"] == b["side_by_side"] == c["side_by_side"] == 2
    logs = tmp_path / "run" / "logs"
    assert "c: ran after a" in (logs / "c.log").read_text() and not (logs / "a.log").read_text()
    assert [ln for ln in lines if ln.startswith("==")] == [
        f"== [1/4] a (side by side with b; log: {logs / 'a.log'})",
        f"== [2/4] b (side by side with a; log: {logs / 'b.log'})",
        f"== [3/4] c (side by side with b; log: {logs / 'c.log'})", "== [4/4] last"]
    seconds = json.loads((tmp_path / "run" / "stages.json").read_text())["seconds"]
    assert list(seconds) == ["a", "b", "c", "last"]
    assert seconds["b"] >= seconds["c"] >= 0.5  # b started with a and ended after c


def test_lanes_must_be_consecutive_stages(tmp_path):
    pipeline, _ = _pipeline(tmp_path)
    with pytest.raises(ValueError, match="one after the other"):
        pipeline.run({"a": partial(_alone, "x", "a"), "mid": lambda: None, "b": partial(_alone, "x", "b")},
                     side_by_side=(("a",), ("b",)))


def test_total_seconds_count_the_longest_lane_once():
    from pipeline.quickstart import total_seconds

    seconds = {"world": 20.0, "clip": 400.0, "llm": 430.0, "datastore": 50.0, "train": 260.0}
    assert total_seconds(seconds, (("clip", "datastore"), ("llm",))) == 20 + 450 + 260
    assert total_seconds(seconds, ()) == sum(seconds.values())


def _start_method(out: str, me: str, side_by_side: int = 1) -> None:
    import multiprocessing

    Path(out, f"{me}.txt").write_text(multiprocessing.get_start_method())


def test_a_lane_starts_its_own_workers_as_the_parent_would(tmp_path):
    """A spawned process defaults to spawning its own children (a DataLoader's workers then re-import
    torch: ~15 s per loader); a lane keeps the platform's default, as an in-process stage has it."""
    import multiprocessing

    pipeline, _ = _pipeline(tmp_path)
    out = str(tmp_path)
    pipeline.run({"a": partial(_start_method, out, "a"), "b": partial(_start_method, out, "b")},
                 side_by_side=(("a",), ("b",)))
    expected = multiprocessing.get_context().get_start_method()
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == expected
