"""tasks/runtime/resources.py's garbage collection around a block: what earlier work left is
collected when the block begins, what survives is set aside (`gc.freeze`) so that collections inside
the
block walk only what the block made, and `thaw()` gives it back to the collector."""

from __future__ import annotations

import gc
import weakref

from tasks.runtime.resources import peak_memory, thaw


class Cycle:
    """An object in a reference cycle, as a released model with hooks often is: only the
    cyclic garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_block_collects_what_came_before_and_sets_the_survivors_aside():
    thaw()
    gc.disable()                # only the block's own collections free anything in this test
    try:
        _collect_and_set_aside()
    finally:
        gc.enable()
        thaw()


def _collect_and_set_aside() -> None:
    left = weakref.ref(Cycle())                 # garbage already, not yet collected
    kept = Cycle()
    assert left() is not None
    with peak_memory():
        assert left() is None, "what earlier work left is collected when the block begins"
        assert gc.get_freeze_count() > 0
        made = weakref.ref(Cycle())
        gc.collect()
        assert made() is None, "what the block makes is still collected inside it"
        dies = weakref.ref(kept)
        del kept
        gc.collect()
        assert dies() is not None, "a survivor of the block's start is set aside"
    thaw()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert dies() is None, "thawed, it is collected again"
