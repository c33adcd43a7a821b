#!/usr/bin/env python3
"""The waits and arrivals of v39's split ring (kernel_versions/mla_decode_v39_split_ring.cu) as a
model, run over random interleavings of its three roles: finds deadlocks and lapped mbarrier
phases for given ring sizes. CPU only.

    python benchmarks/split_ring_model.py            # the three layouts' sizes, and P_READY with 2 slots

Roles per page `it`: the producer fills the page's left and right V halves (V-half ring position
2 it and 2 it + 1) and its rope chunk (rope ring position it), each after the slot's previous
user freed it; warpgroup 0 waits for the three parts, publishes P (P_READY slot it % P) and
frees the left half; warpgroup 1 waits for P, then frees the right half and the rope slot.
An mbarrier wait names a phase by its parity only, so a waiter that finds its barrier two
completions past the one it waits for is lapped: that is what the model reports, with deadlocks.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator

Wait = tuple[tuple[str, int], int]  # (barrier, completions needed)


def simulate(v_slots: int, rope_slots: int, p_slots: int, pages: int = 200, seed: int = 0) -> str:
    """'ok', or what went wrong in one random interleaving."""
    rnd = random.Random(seed)
    done_count: dict[tuple[str, int], int] = {}

    def arrive(bar: tuple[str, int]) -> None:
        done_count[bar] = done_count.get(bar, 0) + 1

    def producer() -> Iterator[Wait]:
        for it in range(pages):
            for n in (2 * it, 2 * it + 1):
                if n >= v_slots:
                    yield ("empty_half", n % v_slots), n // v_slots
                arrive(("full_half", n % v_slots))
            if it >= rope_slots:
                yield ("empty_rope", it % rope_slots), it // rope_slots
            arrive(("full_rope", it % rope_slots))

    def warpgroup0() -> Iterator[Wait]:
        for it in range(pages):
            for n in (2 * it, 2 * it + 1):
                yield ("full_half", n % v_slots), n // v_slots + 1
            yield ("full_rope", it % rope_slots), it // rope_slots + 1
            arrive(("p_ready", it % p_slots))
            arrive(("empty_half", (2 * it) % v_slots))

    def warpgroup1() -> Iterator[Wait]:
        for it in range(pages):
            yield ("p_ready", it % p_slots), it // p_slots + 1
            arrive(("empty_half", (2 * it + 1) % v_slots))
            arrive(("empty_rope", it % rope_slots))

    roles = {"producer": producer(), "warpgroup 0": warpgroup0(), "warpgroup 1": warpgroup1()}
    waiting: dict[str, Wait | None] = {name: next(role, None) for name, role in roles.items()}
    while any(w is not None for w in waiting.values()):
        ready = [name for name, w in waiting.items() if w is not None and done_count.get(w[0], 0) >= w[1]]
        if not ready:
            return f"deadlock: {waiting}"
        name = rnd.choice(ready)
        bar, need = waiting[name]
        if done_count.get(bar, 0) >= need + 1:
            return f"lapped: {name} waits for completion {need} of {bar}, which has {done_count[bar]}"
        waiting[name] = next(roles[name], None)
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interleavings", type=int, default=300)
    args = parser.parse_args()
    # v39's layouts (q_rows 16, 32, 64), then P_READY with one slot too few.
    for sizes in ((5, 3, 3), (5, 2, 3), (4, 2, 3), (5, 3, 2)):
        outcomes = {simulate(*sizes, seed=s) for s in range(args.interleavings)}
        bad = sorted(o for o in outcomes if o != "ok")
        print(f"V halves {sizes[0]}, rope slots {sizes[1]}, P slots {sizes[2]}: "
              f"{'ok' if not bad else bad[0]}")


if __name__ == "__main__":
    main()
