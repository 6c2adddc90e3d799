"""CI hook of the SSE benchmark: ``python -m benchmarks sse --quick`` runs end to end.

It starts real gunicorn (both shmcast examples and the two Redis peers), a
``redis-server`` and the asyncio load process, all on 127.0.0.1, and stops them
by pid. This checks that the harness works and that the shmcast deployments
serve every client; it checks no speed target.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDS = ["gunicorn", "flask", "starlette", "uvicorn", "uvicorn_worker", "redis", "broadcaster"]


def _skip_reason() -> str | None:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return f"bench deps not installed ({', '.join(missing)}): pip install -e '.[bench]'"
    if not (os.environ.get("REDIS_SERVER") or shutil.which("redis-server")):
        return "no redis-server on PATH (apt-get install redis-server)"
    return None


@pytest.mark.timeout(150)
def test_bench_sse_quick(tmp_path: Path) -> None:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "sse", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # About 30 s on an idle 2-core box; the harness's own waits have shorter deadlines.
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            # SIGTERM first: the harness turns it into KeyboardInterrupt and stops the
            # servers it started; a SIGKILL would orphan them.
            proc.terminate()
            try:
                proc.communicate(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out
    results = json.loads((tmp_path / "sse.json").read_text())
    assert not results["unavailable"], results["unavailable"]
    clients = results["cells"]["quick"]["clients"]
    for dep in ("shmcast-asgi", "shmcast-wsgi"):
        (run,) = results["runs"]["quick"][dep]
        assert "error" not in run, f"{dep}: {run.get('error')}\n{out}"
        assert run["connected"] == clients, f"{dep}: {run}"
        assert run["received"] > 0, f"{dep}: {run}"
        assert run["shm_left"] == [], f"{dep} left {run['shm_left']} in /dev/shm"
    for dep in ("broadcaster-asgi", "flask-sse-wsgi"):  # the peers ran too
        (run,) = results["runs"]["quick"][dep]
        assert "error" not in run, f"{dep}: {run.get('error')}\n{out}"
