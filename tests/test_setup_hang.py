"""A setup step that hangs is still bound by the timeout and by cancel (the supervisor waits
for the child's exec inside its event loop, not in a blocking read)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time


def test_hanging_setup_step_times_out() -> None:
    script = textwrap.dedent("""
        import json, time
        from execbox import child as steps
        from execbox.plan.build import build_plan
        from execbox.model.spec import make_spec
        from execbox.supervise.supervision import Supervision

        steps.register("hang", lambda ctx: time.sleep(300))
        spec = make_spec(["/bin/true"], env={}, timeout=0.5, grace=0.5, rlimits={"nofile": 64})
        plan = build_plan(spec, [[0, 0], [1, 1], [2, 2]])
        plan.child.insert(2, ("hang", ()))
        supervision = Supervision(spec, plan)
        started = time.monotonic()
        supervision.start()
        result = supervision.run()
        print(json.dumps({"timed_out": result.timed_out, "signal": result.signal,
                          "elapsed": time.monotonic() - started}))
    """)
    before = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    import json

    data = json.loads(proc.stdout)
    assert data["timed_out"] is True and data["signal"] == "SIGTERM"
    assert data["elapsed"] < 5 and time.monotonic() - before < 30
