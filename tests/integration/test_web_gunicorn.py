"""Real gunicorn running examples/gunicorn_sse (Flask under gunicorn gthread workers).

Each test starts gunicorn on 127.0.0.1 (a free port), connects real HTTP
clients, and stops gunicorn by its pid; see _web_helpers.py.
"""

from __future__ import annotations

import pytest

try:
    from . import _web_helpers as web
except ImportError:  # tests/ is not a package
    import _web_helpers as web

EXAMPLE = "gunicorn_sse"


@pytest.fixture(autouse=True)
def _deps():
    web.require("gunicorn", "flask", "httpx")


@pytest.mark.timeout(40)
def test_every_client_gets_every_event_and_a_stalled_one_slows_nobody(bus_name, tmp_path):
    web.scenario_fanout_and_stalled_client(EXAMPLE, bus_name, tmp_path)


@pytest.mark.timeout(60)
def test_bus_survives_worker_sigkill_and_sighup_reload(bus_name, tmp_path):
    web.scenario_worker_killed_and_reload(EXAMPLE, bus_name, tmp_path)


@pytest.mark.timeout(60)
def test_bus_survives_max_requests_recycling(bus_name, tmp_path):
    # Stopped with SIGTERM: gunicorn 27.0.1's gthread worker can deadlock in
    # its own SIGQUIT handler (Ctrl-C), see docs/howto-gunicorn.md.
    web.scenario_max_requests(EXAMPLE, bus_name, tmp_path)


@pytest.mark.timeout(30)
def test_endpoints_snapshot_on_connect_and_keepalive_comments(bus_name, tmp_path):
    web.scenario_quiet_bus(EXAMPLE, bus_name, tmp_path)


@pytest.mark.timeout(60)
def test_reconnect_with_last_event_id_to_another_worker(bus_name, tmp_path):
    web.scenario_resume_on_another_worker(EXAMPLE, bus_name, tmp_path)


@pytest.mark.timeout(60)
def test_post_publish_reaches_the_streams_of_every_worker(bus_name, tmp_path):
    web.scenario_publish_from_workers(EXAMPLE, bus_name, tmp_path)


@pytest.mark.timeout(60)
def test_post_publish_with_the_master_stopped_never_waits(bus_name, tmp_path):
    web.scenario_publish_while_the_master_is_stopped(EXAMPLE, bus_name, tmp_path)
