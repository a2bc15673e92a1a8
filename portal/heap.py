"""Long-lived objects out of the garbage collector's way.

A Sluice process holds about half a million objects that live as long as it does (Django,
Celery, torch, transformers, the safety encoder). CPython's full (generation 2) collection
walks all of them - about 200 ms on our 2-core machine, with the GIL held - each time enough
new objects have survived since the last one: a stall of every request and stream in the
process at once (paired bench-text runs: time-to-first-token p99 and CPU per stream improved
a little with the heap frozen).
`gc.freeze()` moves every object tracked now into a permanent generation that collections
skip (and, before a fork, keeps the collector from touching pages the children share).
Objects made later are collected as usual.
"""

from __future__ import annotations

import atexit
import gc
import logging

logger = logging.getLogger(__name__)
# At exit the frozen objects go back to the collector, so the interpreter's last collections
# still reach them: left frozen, extension types count as leaked (nanobind prints a page of
# "leaked" warnings for triton's at every worker shutdown).
atexit.register(gc.unfreeze)


def long_lived_freeze(*, after: str) -> int:
    """Freeze what the process holds now; call it once it has loaded what it keeps.
    Returns how many objects are frozen in all."""
    gc.collect()  # what is already garbage is freed first, not kept for ever
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze %d long-lived objects after %s", frozen, after)
    return frozen
