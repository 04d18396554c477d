"""One Result, one codec: what the supervisor sends, the API returns and --result writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import execbox
from conftest import run_cli
from execbox.model.result import Failure, Result, Usage

FIELDS = {"exit_code", "signal", "signal_number", "timed_out", "cancelled", "failure", "usage",
          "pid", "started_at", "ended_at", "pty_fallback", "oom_killed", "unkillable",
          "output_dropped", "cleanup_errors"}


@given(exit_code=st.integers(0, 255), unkillable=st.lists(st.integers(1, 1 << 22)),
       problems=st.lists(st.text()), dropped=st.dictionaries(st.sampled_from(["stdout",
                                                                              "stderr"]),
                                                             st.integers(1, 1 << 40)),
       failure=st.none() | st.builds(Failure, st.text(), st.text(), st.text(), st.text()))
def test_the_codec_round_trips(exit_code: int, unkillable: list[int], problems: list[str],
                               dropped: dict[str, int], failure: Failure | None) -> None:
    result = Result(exit_code=exit_code, failure=failure, unkillable=unkillable,
                    cleanup_errors=problems, output_dropped=dropped,
                    usage=Usage(user_time=1.5, termination_signal="KILL"),
                    started_at=1.0, ended_at=2.0, signal="SIGKILL", signal_number=9)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == FIELDS
    assert Result.from_dict(data) == result


def test_the_api_and_the_cli_write_the_same_record(tmp_path: Path) -> None:
    before = time.time()
    api = execbox.run(["sh", "-c", "kill -9 $$"])
    record = tmp_path / "r.json"
    run_cli("run", "--result", str(record), "--", "sh", "-c", "kill -9 $$")
    cli = json.loads(record.read_text())
    assert set(cli) == set(api.to_dict()) == FIELDS
    for data in (api.to_dict(), cli):
        assert data["signal"] == "SIGKILL" and data["signal_number"] == 9
        assert data["usage"]["termination_signal"] == "KILL"
        assert before <= data["started_at"] <= data["ended_at"] <= time.time()
        assert data["unkillable"] == [] and data["cleanup_errors"] == []
