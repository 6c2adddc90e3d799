"""The pytest plugin, exercised with pytester in a subprocess pytest run."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.mark.timeout(120)
def test_fixture_gives_a_working_unique_bus_and_cleans_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        import shmcast

        seen = []

        def test_one(shmcast_bus, shmcast_leak_check):
            assert os.path.exists("/dev/shm/shmcast." + shmcast_bus.name)
            with shmcast.subscribe(shmcast_bus.name) as sub:
                shmcast_bus.publish("x", 1)
                assert sub.get(timeout=5).payload == 1
            seen.append(shmcast_bus.name)

        def test_two(shmcast_bus):
            seen.append(shmcast_bus.name)
            assert len(set(seen)) == len(seen)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


@pytest.mark.timeout(120)
def test_leak_check_fails_a_leaking_test(pytester: pytest.Pytester, bus_name: str) -> None:
    pytester.makepyfile(
        f"""
        import shmcast

        leaked = []

        def test_leaks(shmcast_leak_check):
            leaked.append(shmcast.Bus({bus_name!r}))  # never closed during the test
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*left shmcast objects*shmcast.{bus_name}*"])


@pytest.mark.timeout(120)
def test_plugin_works_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import shmcast

        @pytest.mark.parametrize("i", range(6))
        def test_many(shmcast_bus, shmcast_leak_check, i):
            with shmcast.subscribe(shmcast_bus.name) as sub:
                assert shmcast_bus.publish("n", i) == 1
                assert sub.get(timeout=5).payload == i
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=6)
