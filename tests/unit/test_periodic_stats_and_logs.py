"""The periodic stats line (rates over the interval, quiet while idle) and the size-capped logs a
launcher writes for its children (rotated, nothing lost)."""

from __future__ import annotations

import os
import subprocess
import sys

from deploy.logs import LogPump
from epd.periodic_stats import PeriodicStats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_gives_rates_over_the_interval_and_the_gauges_then_stays_quiet_while_idle():
    clock = Clock()
    stats = PeriodicStats(10.0, clock)
    clock.now += 10
    assert stats.line({"prompt tokens": 0}, {"running": 0}) is None     # nothing done yet: nothing said
    clock.now += 5
    assert not stats.due() and stats.line({"prompt tokens": 50}, {"running": 1}) is None   # not yet
    clock.now += 5
    assert stats.line({"prompt tokens": 1000}, {"running": 2, "KV usage": "12.5%"}) == \
        "prompt tokens 100.0/s, running 2, KV usage 12.5%"
    clock.now += 10
    assert stats.line({"prompt tokens": 1000}, {"running": 0, "KV usage": "0.0%"}) == \
        "prompt tokens 0.0/s, running 0, KV usage 0.0%"                   # the first idle line is shown
    clock.now += 10
    assert stats.line({"prompt tokens": 1000}, {"running": 0, "KV usage": "0.0%"}) is None   # then quiet
    clock.now += 10
    assert stats.line({"prompt tokens": 1000}, {"running": 0, "waiting": 3}) == \
        "prompt tokens 0.0/s, running 0, waiting 3"                       # work waiting is not idle
    assert PeriodicStats(0.0, clock).line({"x": 1}, {}) is None           # 0: no lines at all


def test_a_childs_output_is_rotated_at_the_cap_and_nothing_is_lost(tmp_path):
    path = str(tmp_path / "node.log")
    script = "import sys\nfor i in range(2000):\n    print(f'line {i:05d} ' + 'x' * 40)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pump = LogPump(path, max_bytes=20_000, backups=2).start(proc.stdout)
    proc.wait(30)
    pump.join()
    files = sorted(os.listdir(tmp_path))
    assert files == ["node.log", "node.log.1", "node.log.2"]               # older ones deleted
    assert all(os.path.getsize(tmp_path / f) <= 20_000 for f in files)
    kept = b"".join((tmp_path / f).read_bytes() for f in ["node.log.2", "node.log.1", "node.log"]).splitlines()
    numbers = [int(line.split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 2000)) and numbers[0] > 0     # the newest lines, in order


def test_chosen_lines_are_echoed_to_the_console(tmp_path, capfd):
    proc = subprocess.Popen([sys.executable, "-c", "print('noise'); print('x epd.stats: router: 1.0/s')"],
                            stdout=subprocess.PIPE)
    pump = LogPump(str(tmp_path / "r.log"), echo=lambda line: b"epd.stats" in line).start(proc.stdout)
    proc.wait(30)
    pump.join()
    out = capfd.readouterr().out
    assert "epd.stats: router: 1.0/s" in out and "noise" not in out
    assert (tmp_path / "r.log").read_text().splitlines() == ["noise", "x epd.stats: router: 1.0/s"]
