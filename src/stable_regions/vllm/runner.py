"""Model Runner V2's side of the processor, free of vLLM: which slots hold monitored requests,
and their sampled tokens read from the runner's buffers.

The runner keeps each slot's tokens in ``all_token_ids`` (slot, position) and their count in
``total_len``, on the device; a request's outputs are positions ``prompt_len`` to
``total_len``. It has no hook for a request leaving: a slot's last occupant is known to be
gone when ``add_request`` hands the slot to the next one, which happens before the runner
writes the newcomer's prompt over the slot's tokens, so the leaver's last tokens are read
then. Between steps the core's background flush reads them too (``MonitorCore.before_flush``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .core import MonitorCore


class RunnerSlots:
    """The monitored slots of a V2 runner, each with a host list mirroring its output ids.

    ``states``: the runner's request state as vLLM shows it to processors
    (``LogitsProcRequestState``: ``all_token_ids.gpu``, ``total_len.gpu``,
    ``prompt_len.np``). ``sync`` reads the counts of every mirrored slot in one gather and
    the new tokens in a second: two reads per step, whatever the batch.
    """

    def __init__(self, core: MonitorCore, states) -> None:
        self.core = core
        self.states = states
        self.lists: dict[int, list[int]] = {}
        self.prompt: dict[int, int] = {}
        core.before_flush = self.sync

    def add(self, slot: int, extra_args: Mapping | None) -> bool:
        """A request takes ``slot``; True where it is monitored."""
        with self.core.lock:
            self.sync([slot])  # the slot's last occupant's last tokens (core.add writes them)
            self.lists[slot] = []
            self.prompt[slot] = int(self.states.prompt_len.np[slot])
            self.core.add(slot, extra_args, self.lists[slot])
            if slot not in self.core.slots:  # not asked for (or options it cannot use)
                del self.lists[slot], self.prompt[slot]
                return False
            return True

    def observe(self, logits: Tensor, slot_of_row: np.ndarray) -> None:
        """One step's logits: the lists first, so that each row's step is its own."""
        with self.core.lock:
            self.sync()
            self.core.observe(logits, slot_of_row)

    def sync(self, slots: list[int] | None = None) -> None:
        """Append the tokens sampled since the last sync to the lists of ``slots`` (all)."""
        slots = list(self.lists) if slots is None else [s for s in slots if s in self.lists]
        if not slots:
            return
        lengths = self.states.total_len.gpu
        totals = lengths.index_select(0, torch.tensor(slots, device=lengths.device)).tolist()
        rows: list[int] = []
        cols: list[int] = []
        for slot, total in zip(slots, totals, strict=True):
            start = self.prompt[slot] + len(self.lists[slot])
            rows += [slot] * max(0, total - start)
            cols += range(start, total)
        if not rows:
            return
        table = self.states.all_token_ids.gpu
        index = (torch.tensor(rows, device=table.device), torch.tensor(cols, device=table.device))
        for slot, token in zip(rows, table[index].tolist(), strict=True):
            self.lists[slot].append(int(token))


def slot_of_row(
    rows: int, idx_mapping_np: np.ndarray, expanded_idx_mapping: Tensor, local_pos: Tensor
) -> np.ndarray:
    """Row -> slot under V2. With speculative decoding a request has a row per draft token;
    only its first row's context is committed, so only that row is observed (the others get
    slot -1, which holds no request)."""
    if rows == len(idx_mapping_np):
        return idx_mapping_np
    slots = expanded_idx_mapping.cpu().numpy().copy()
    slots[local_pos.cpu().numpy() != 0] = -1
    return slots
