"""Host-side allocator of KV cache slots: one slot per active request, never leaked."""

from __future__ import annotations


class SlotAllocator:
    """Hands out slot indices ``0..capacity-1`` to request ids and takes them back."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives the lowest free slot
        self._owners: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def slot_of(self, request_id: str) -> int | None:
        return self._owners.get(request_id)

    def assign(self, request_id: str) -> int:
        if request_id in self._owners:
            raise ValueError(f"request {request_id!r} already holds cache slot {self._owners[request_id]}")
        if not self._free:
            raise ValueError(f"no free KV cache slot for request {request_id!r}: all {self.capacity} are in use "
                             "(release finished requests, or load with a larger max_batch_size)")
        slot = self._free.pop()
        self._owners[request_id] = slot
        return slot

    def release(self, request_id: str) -> int:
        if request_id not in self._owners:
            raise ValueError(f"unknown request_id {request_id!r}: it holds no cache slot")
        slot = self._owners.pop(request_id)
        self._free.append(slot)
        self._free.sort(reverse=True)
        return slot
