"""Host-side bookkeeping of the paged KV cache: which pages each request holds, reference counts, and the prefix
cache that lets requests share the pages of a common prompt prefix.

A page holds ``page_size`` consecutive positions of one sequence. Once every position of a page is written, the
page is entered in the prefix index under a hash chain of the tokens up to its end (plus a salt for whatever
else changes K/V: the LoRA adapter), so a later request whose prompt starts with the same tokens takes the page
(its reference count goes up) instead of computing it again. Pages are read-only once shared: a request writes
only positions past its cached prefix, and those live on pages of its own. A page whose count drops to 0 stays in
the index (least recently used first) until a new page is needed and no free one is left.

The last, partly filled page of a released request is kept too, under the key of the pages before it and its
tokens: a later request whose prompt continues the same way (the next turn of a chat) copies the page's matching
positions into a page of its own instead of computing them (``PageTable.admit`` returns the copy to make).

Nothing here touches a device; the engine's programs take the block tables ``table()`` builds.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class KVCacheFull(ValueError):
    """The KV cache has too few free pages for what was asked; nothing was changed. Schedulers catch it to wait
    or to preempt a request (release it and encode its tokens again later)."""


def root_key(salt: str) -> bytes:
    """The key before a sequence's first page."""
    return hashlib.blake2b(salt.encode(), digest_size=16).digest()


def page_keys(tokens: np.ndarray, page_size: int, salt: str = "", start: bytes = b"") -> list[bytes]:
    """The hash chain of the full pages of ``tokens``: key i covers tokens[: (i + 1) * page_size] and ``salt``."""
    keys, key = [], start or root_key(salt)
    tokens = np.ascontiguousarray(tokens, np.int32)
    for i in range(len(tokens) // page_size):
        key = hashlib.blake2b(key + tokens[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


class PagePool:
    """Page ids ``0..num_pages-1`` with reference counts, a free list and the prefix index."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self._free = list(range(num_pages - 1, -1, -1))  # pop() gives the lowest free page
        self._refs = np.zeros(num_pages, np.int32)
        self._index: dict[bytes, int] = {}  # prefix key -> page
        self._key_of: dict[int, bytes] = {}  # page -> its prefix key
        self._idle: OrderedDict[int, None] = OrderedDict()  # indexed pages nobody holds, least recently used first
        self._partial: dict[bytes, dict[int, np.ndarray]] = {}  # key of the pages before -> {page: its tokens}
        self._partial_of: dict[int, bytes] = {}
        self.hit_tokens = 0  # prompt tokens served from the prefix cache
        self.queried_tokens = 0  # prompt tokens looked up

    @property
    def num_available(self) -> int:
        """Pages a request can be given now: free ones plus cached ones nobody holds (evicted when taken)."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Pages some request holds."""
        return int(np.count_nonzero(self._refs))

    @property
    def num_cached(self) -> int:
        """Pages in the prefix index (held or idle), partly filled ones included."""
        return len(self._index) + len(self._partial_of)

    def is_idle(self, page: int) -> bool:
        """Whether a cached page is held by nobody (taking it makes it unavailable to others)."""
        return page in self._idle

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pages of the longest indexed prefix of ``keys`` (no reference taken)."""
        pages = []
        for key in keys if self.prefix_caching else ():
            page = self._index.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def acquire(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                self._idle.pop(page, None)
            self._refs[page] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` pages held once each: free ones first, then the least recently used idle cached ones."""
        if n > self.num_available:
            raise KVCacheFull(f"the KV cache needs {n} more pages but has {self.num_available} available "
                              f"({self.num_pages} pages of {self.page_size} positions)")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)
                self._forget(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        """Drops one reference to each page; an unreferenced page goes idle (indexed) or free."""
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] < 0:
                raise AssertionError(f"page {page} released more often than it was held")
            if self._refs[page] == 0:
                if page in self._key_of or page in self._partial_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def register(self, page: int, key: bytes) -> None:
        """Enters a fully written page under ``key``; a key already indexed keeps its page (this one stays private)."""
        if self.prefix_caching and key not in self._index and page not in self._key_of:
            self._index[key] = page
            self._key_of[page] = key

    def register_partial(self, page: int, parent: bytes, tokens: np.ndarray) -> None:
        """Keeps a partly filled page (``tokens`` at its first positions) after the pages keyed ``parent``."""
        if self.prefix_caching and len(tokens) and page not in self._key_of and page not in self._partial_of:
            self._partial.setdefault(parent, {})[page] = np.array(tokens, np.int32)
            self._partial_of[page] = parent

    def lookup_partial(self, parent: bytes, tokens: np.ndarray) -> tuple[int, int]:
        """(page, n): the kept partial page after ``parent`` whose first n tokens equal ``tokens[:n]``, n largest
        (0 when none matches)."""
        best = (-1, 0)
        for page, held in self._partial.get(parent, {}).items() if self.prefix_caching else ():
            n = min(len(held), len(tokens))
            differ = np.flatnonzero(held[:n] != tokens[:n])
            n = int(differ[0]) if differ.size else n
            if n > best[1]:
                best = (page, n)
        return best

    def _forget(self, page: int) -> None:
        """Takes a page out of the prefix index (it is being reused)."""
        if page in self._key_of:
            del self._index[self._key_of.pop(page)]
        if page in self._partial_of:
            parent = self._partial_of.pop(page)
            del self._partial[parent][page]
            if not self._partial[parent]:
                del self._partial[parent]

    def clear_cache(self) -> None:
        """Forgets every indexed page (idle ones become free), e.g. after the weights changed."""
        for page in self._idle:
            self._free.append(page)
        self._idle.clear()
        self._index.clear()
        self._key_of.clear()
        self._partial.clear()
        self._partial_of.clear()


class _Held:
    """One request's pages, and the prefix keys of its full written pages (entered in the index, or found there)."""

    __slots__ = ("pages", "salt", "keys")

    def __init__(self, salt: str):
        self.pages: list[int] = []
        self.salt = salt
        self.keys: list[bytes] = []  # hash chain of its full written pages, one per registered page


class PageTable:
    """Requests' pages in one ``PagePool``: admission with prefix hits, growth, block tables, release."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.page_size = pool.page_size
        self._held: dict[str, _Held] = {}

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def pages_of(self, request_id: str) -> list[int]:
        return list(self._held[request_id].pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def prefix_keys(self, tokens: np.ndarray, salt: str) -> list[bytes]:
        """The keys of the prompt pages a new request may share: full pages only, never the one holding the
        prompt's last token (its logits must be computed)."""
        usable = (len(tokens) - 1) // self.page_size * self.page_size
        return page_keys(tokens[:usable], self.page_size, salt)

    def cached_prefix(self, tokens: np.ndarray, salt: str) -> list[int]:
        """The cached pages a new request with prompt ``tokens`` would share (see `prefix_keys`)."""
        return self.pool.lookup(self.prefix_keys(tokens, salt))

    def admit(self, request_id: str, tokens: np.ndarray, salt: str = "",
              use_cache: bool = True) -> tuple[int, tuple[int, int] | None]:
        """Starts holding pages for a request: its cached prefix (when ``use_cache``). Returns the number of
        prompt tokens whose K/V is there, and the (source, destination) pages to copy first when the prefix ends
        inside a kept partial page (the destination is the request's own; the copy must run before the pool
        hands the source out again, i.e. before the next allocation)."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already holds KV cache pages")
        held = _Held(salt)
        hits = self.cached_prefix(tokens, salt) if use_cache else []
        self.pool.acquire(hits)
        held.pages = list(hits)
        held.keys = page_keys(tokens[:len(hits) * self.page_size], self.page_size, salt)
        self._held[request_id] = held
        cached, copy = len(hits) * self.page_size, None
        if use_cache:  # the partial page that continues the prefix (never the prompt's last token)
            parent = held.keys[-1] if held.keys else root_key(salt)
            source, n = self.pool.lookup_partial(parent, tokens[cached:min(len(tokens) - 1, cached + self.page_size)])
            if n:
                self.pool.acquire([source])  # not handed out by the allocation below
                held.pages += self.pool.allocate(1)
                self.pool.release([source])
                copy, cached = (source, held.pages[-1]), cached + n
        self.pool.queried_tokens += len(tokens)
        self.pool.hit_tokens += cached
        return cached, copy

    def new_pages_needed(self, request_id: str | None, num_tokens: int) -> int:
        """Pages to allocate so that the request holds ``num_tokens`` positions (None: a request not admitted)."""
        held = 0 if request_id is None or request_id not in self._held else len(self._held[request_id].pages)
        return max(0, self.pages_for(num_tokens) - held)

    def reserve(self, request_id: str, num_tokens: int) -> None:
        """Grows the request's pages to hold ``num_tokens`` positions (KVCacheFull when the pool is short)."""
        held = self._held[request_id]
        held.pages += self.pool.allocate(self.new_pages_needed(request_id, num_tokens))

    def commit(self, request_id: str, tokens: np.ndarray) -> None:
        """Registers the request's pages that ``tokens`` (every token whose K/V is written) now fill."""
        held = self._held[request_id]
        done, full = len(held.keys), min(len(tokens) // self.page_size, len(held.pages))
        if full <= done:
            return
        held.keys += page_keys(tokens[done * self.page_size:full * self.page_size], self.page_size, held.salt,
                               held.keys[-1] if held.keys else b"")
        for i in range(done, full):
            self.pool.register(held.pages[i], held.keys[i])

    def row(self, request_id: str, width: int) -> np.ndarray:
        """One request's block table of ``width`` entries (unused ones: page 0, see `table`)."""
        out = np.zeros(width, np.int32)
        pages = self._held[request_id].pages[:width]
        out[:len(pages)] = pages
        return out

    def table(self, request_ids: list[str | None], width: int) -> np.ndarray:
        """Block tables [len(request_ids), width] int32 (None: a padding row); unused entries are page 0, which
        masked positions never read and padding positions never write."""
        out = np.zeros((len(request_ids), width), np.int32)
        for r, rid in enumerate(request_ids):
            if rid is not None:
                out[r] = self.row(rid, width)
        return out

    def release(self, request_id: str, written: np.ndarray | None = None) -> None:
        """Gives back the request's pages (registered ones stay cached until evicted). ``written``: the tokens
        whose K/V the request wrote, to keep its last partly filled page for a continuation (None: keep none,
        e.g. after a failed call)."""
        held = self._held.pop(request_id, None)
        if held is None:
            raise ValueError(f"unknown request_id {request_id!r}: it holds no KV cache pages")
        full = len(held.keys)
        if written is not None and full < len(held.pages) and len(written) > full * self.page_size:
            tail = written[full * self.page_size:(full + 1) * self.page_size]
            if len(tail) < self.page_size:
                self.pool.register_partial(held.pages[full], held.keys[-1] if full else root_key(held.salt), tail)
        self.pool.release(held.pages)
