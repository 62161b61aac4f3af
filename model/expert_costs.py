"""The cost model that chooses how the experts' slots run when the device offers no kernel for them.

Two choices, per call, from the slots each expert has (the counts): the capacity, that is
how many slots per expert run batched (every expert padded to it, two batched matmuls
over all experts), and whether the slots beyond it run as one grouped matmul or as a
matmul pair per expert that has them. Costs are in slot rows of batched arithmetic.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExpertCosts:
    """Costs, in slot rows of batched arithmetic, that steer the choices.

    rows_per_batched_weight_read: reading one expert's weights in the batched matmuls
    (which stream every expert's, with slots or not); rows_per_weight_read: reading them
    for its slots outside the batch; rows_per_extra_matmul: one more per-expert matmul
    pair run from Python; rows_per_extra_group: one more group in a grouped matmul;
    rows_per_group_visited: each group a grouped matmul visits, empty or not (torch's CPU
    grouped matmul walks them all). A slot row outside the batch costs as many batched
    rows as there are intra-op threads: a batched matmul spreads its experts over them, a
    small per-expert one gains little from them.

    The defaults were fitted to measured times over capacities and both ways of running
    the slots beyond them, for routings of 1 to 512 tokens (uniform and skewed, 64
    experts, weights not in cache) on a 2-core x86 CPU: the choice is within 17% of the
    fastest in each of 20 cases. Another device may want other numbers.
    """

    rows_per_batched_weight_read: int = 10
    rows_per_weight_read: int = 10
    rows_per_extra_matmul: int = 8
    rows_per_extra_group: int = 3
    rows_per_group_visited: int = 4

    def capacity(self, sizes: list[int], experts: int, threads: int, grouped_here: bool) -> int:
        """Slots per expert to run batched (0: none), for `experts` experts with these slot counts:
        padding every expert to it, plus the slots beyond it run per expert, cheapest together.
        `grouped_here`: whether a grouped matmul can run the slots beyond it."""
        nonzero = sorted(size for size in sizes if size)
        best, best_cost = 0, self._beyond(nonzero, 0, experts, threads, grouped_here)
        for capacity in sorted(set(nonzero)):
            batched = experts * (capacity + self.rows_per_batched_weight_read)
            if batched >= best_cost:  # the batched part alone grows with the capacity: nothing larger wins
                break
            cost = batched + self._beyond(nonzero, capacity, experts, threads, grouped_here)
            if cost < best_cost:
                best, best_cost = capacity, cost
        return best

    def grouped_beyond(self, sizes: list[int], capacity: int, experts: int, threads: int) -> bool:
        """Whether the slots beyond `capacity` cost less as one grouped matmul than as a loop."""
        loop, grouped = self._ways_beyond(sizes, capacity, experts, threads)
        return grouped < loop

    def _beyond(self, sizes: list[int], capacity: int, experts: int, threads: int, grouped_here: bool) -> int:
        """Cost of the slots beyond `capacity`: the cheaper way where grouped matmuls can run, else the loop."""
        loop, grouped = self._ways_beyond(sizes, capacity, experts, threads)
        return min(loop, grouped) if grouped_here else loop

    def _ways_beyond(self, sizes: list[int], capacity: int, experts: int, threads: int) -> tuple[int, int]:
        """Cost of the slots beyond `capacity` as a loop of per-expert matmuls, and as one grouped matmul."""
        over = rows = 0
        for size in sizes:
            if size > capacity:
                over += 1
                rows += size - capacity
        if not over:
            return 0, 0
        cost = max(1, threads) * rows + self.rows_per_weight_read * over
        return (cost + self.rows_per_extra_matmul * over,
                cost + self.rows_per_extra_group * over + self.rows_per_group_visited * experts)
