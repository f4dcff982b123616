"""Progress lines for long work: a report repeated on a timer, and an estimate of the time left."""

from __future__ import annotations

import threading
import time
from typing import Callable


def every_few_seconds(report: Callable[[float], None], every: float = 20.0) -> threading.Event:
    """Calls report(seconds so far) every `every` seconds on a daemon thread until the returned event is set."""
    stop, began = threading.Event(), time.monotonic()

    def loop() -> None:
        while not stop.wait(every):
            report(time.monotonic() - began)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def time_left(done: float, total: float, seconds: float) -> str:
    """"ETA 3m20s" at the rate so far, or "" before anything is done."""
    if done <= 0 or total <= done:
        return "ETA 0s" if total and done >= total else ""
    left = round(seconds / done * (total - done))
    hours, rest = divmod(left, 3600)
    minutes, secs = divmod(rest, 60)
    return "ETA " + (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
