"""Progress lines of long work: the time left, and a report on a timer."""

import time

from tgdpo_ray.common.progress import every_few_seconds, time_left


def test_time_left_is_at_the_rate_so_far():
    assert time_left(0, 10, 5.0) == ""  # nothing done: no rate yet
    assert time_left(2, 10, 30.0) == "ETA 2m00s"
    assert time_left(1, 100, 100.0) == "ETA 2h45m"
    assert time_left(9, 10, 9.0) == "ETA 1s"
    assert time_left(10, 10, 9.0) == "ETA 0s"


def test_a_timed_report_runs_until_stopped():
    seen = []
    stop = every_few_seconds(seen.append, every=0.05)
    time.sleep(0.5)
    stop.set()
    count = len(seen)
    time.sleep(0.2)
    assert count >= 3 and len(seen) <= count + 1  # it stops (one call may have been under way)
    assert seen == sorted(seen) and seen[0] >= 0.05
