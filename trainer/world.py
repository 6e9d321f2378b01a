"""Which share of the work this process does: one of `size` ranks training one model.

A single process is World(rank=0, size=1), for which every method is the identity, so
`--nproc 1` runs exactly the steps it always did. With several processes each rank takes
an equal, disjoint share of every epoch's shuffled order (the remainder that does not
divide evenly is left out, as DistributedSampler's drop_last does), so all ranks run the
same number of steps and meet at the same collective calls.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    def shard_len(self, n: int) -> int:
        """Samples each rank sees per epoch."""
        return n // self.size

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's part of an epoch's order: every size-th index, starting at rank."""
        if self.size == 1:
            return order
        return order[self.rank:self.shard_len(len(order)) * self.size:self.size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor


SINGLE = World()
