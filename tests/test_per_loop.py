"""PerLoop: one object per event loop, closed with its loop, never keeping a loop alive."""

from __future__ import annotations

import asyncio
import gc
import weakref

from asgi_token_refresh.kit import PerLoop


class Pool:
    def __init__(self) -> None:
        self.closed_on: asyncio.AbstractEventLoop | None = None
        self.made_on = asyncio.get_running_loop()

    async def aclose(self) -> None:
        self.closed_on = asyncio.get_running_loop()


def test_each_loop_gets_its_own_object_closed_on_that_loop_when_it_shuts_down() -> None:
    pools: PerLoop[Pool] = PerLoop(Pool, close=Pool.aclose)
    made: list[Pool] = []

    async def use() -> None:
        first = pools.get()
        assert pools.get() is first
        made.append(first)

    for _ in range(3):
        asyncio.run(use())
    assert len({id(pool) for pool in made}) == 3
    assert all(pool.closed_on is pool.made_on for pool in made)


def test_a_finished_loop_is_not_kept_alive_by_its_object() -> None:
    pools: PerLoop[Pool] = PerLoop(Pool, close=Pool.aclose)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def use() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        pools.get()

    for _ in range(5):
        asyncio.run(use())
    gc.collect()
    assert [loop() for loop in loops] == [None] * 5
    assert "loops=0" in repr(pools)


def test_popping_hands_the_object_over_and_the_loop_does_not_close_it_again() -> None:
    closes: list[Pool] = []

    async def close(pool: Pool) -> None:
        closes.append(pool)

    pools: PerLoop[Pool] = PerLoop(Pool, close=close)

    async def use() -> Pool | None:
        assert pools.pop() is None  # nothing made on this loop yet
        made = pools.get()
        assert pools.pop() is made
        return made

    assert asyncio.run(use()) is not None
    assert closes == []
