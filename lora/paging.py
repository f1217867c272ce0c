"""Optimizer state in pages: resident on the device, or in host memory streamed through the device.

    store = StateStore(device, paged=True, page_budget_bytes=64 << 20)
    pages = store.add(key, n_elements, layout)        # zero-filled state for n_elements
    for page, state in store.stream(pages):           # state: dict of device tensors, one page
        update(page.start, page.end, state)           # in place; written back after the update
    store.read(key, start, stop) / store.write(key, start, stop, values)   # checkpoints

The state of a run of elements is a few named pieces (exp_avg, exp_avg_sq, or 8-bit codes and
absmax): a `Layout`. A page is a contiguous run of whole 256-element blocks whose pieces lie one
after the other in one byte buffer, so a page moves in one copy each way.

Note [paged optimizer state]
    With paged=False each key is one page that lives on the device; `stream` hands out views of it.
    With paged=True the pages live in host memory (pinned when the device is a GPU, so copies are
    asynchronous) and the device holds only `n_slots` page-sized slots: the working set, which
    fits in `page_budget_bytes`. `stream` is a pipeline over three CUDA streams:

        copy-in stream     load page i+n-1 into the slot page i-1 used, once its write-back ended
        compute (current)  wait until page i is loaded, update it (the caller's kernel)
        copy-out stream    once the update of page i ended, copy its slot back to host memory

    Events order each hand-over: `loaded[slot]` (copy-in -> compute), one `updated` event
    (compute -> copy-out), `written[slot]` (copy-out -> the next copy-in into that slot), and
    `step_done` (the last write-back of a step -> the first copy-in of the next step, and the
    host before it reads or writes a page). The slots are allocated on the compute stream and
    used on the two copy streams: `record_stream` on both tells the caching allocator not to
    reuse their memory, once freed, before the copies queued there have ended.

    Pages stay resident on the device while they fit: a page is placed on the device when the
    resident pages, that page and the slots (N_SLOTS x page size) together stay within the budget,
    and in host memory otherwise. With a budget of at least the whole state plus the slots, a paged
    step is an unpaged one (the state never moves); with a smaller one, only what does not fit
    crosses the link. `stream` starts the copies of the host pages, updates the resident pages
    while those copies run, then the streamed ones.

    Without CUDA the same loop runs with plain synchronous copies and no streams, so CPU tests
    cover the paging (page boundaries, slot reuse, write-back) and give the same numbers as
    paged=False. This is not CUDA managed memory: nothing here can oversubscribe the GPU.

Note [page size]
    Every page is at most `MAX_PAGE_BYTES` (16 MiB) and at most an eighth of the budget, and there
    are `N_SLOTS` (4) slots, so the slots take at most half the budget and the rest can keep pages
    resident. Small pages shorten the start and end of the pipeline (the first copy-in and the
    last write-back are not hidden), and even 8 MiB (the default budget's) keeps each copy long
    (~0.15 ms over PCIe 5) next to the ~50 us of launches per page. A streamed page crosses PCIe
    twice per step, so the streamed part of a step is bounded by the link (about 50 GB/s each
    way), not by the update (about 3 TB/s of device memory).
"""
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["BLOCK", "Piece", "Layout", "Page", "StateStore", "DEFAULT_PAGE_BUDGET_BYTES"]

BLOCK = 256  # elements; pages, tensors in flat buffers and 8-bit absmax blocks align to it
N_SLOTS = 4
MAX_PAGE_BYTES = 16 << 20
DEFAULT_PAGE_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class Piece:
    """One named part of the state: `per_block` values of `dtype` for every BLOCK elements."""

    name: str
    dtype: torch.dtype
    per_block: int  # BLOCK for one value per element, 1 for one value per block
    fill: float = 0  # the value of a fresh (zero) state

    @property
    def block_bytes(self) -> int:
        return self.per_block * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """The pieces of the state of a run of blocks, stored one after the other in a byte buffer."""

    pieces: tuple[Piece, ...]

    @property
    def block_bytes(self) -> int:
        return sum(piece.block_bytes for piece in self.pieces)

    def views(self, buffer: torch.Tensor, n_blocks: int) -> dict[str, torch.Tensor]:
        """Typed views of `buffer` (uint8, at least n_blocks * block_bytes) for n_blocks blocks."""
        views, offset = {}, 0
        for piece in self.pieces:
            size = n_blocks * piece.block_bytes
            views[piece.name] = buffer[offset : offset + size].view(piece.dtype)
            offset += size
        return views

    def fill_(self, buffer: torch.Tensor, n_blocks: int) -> None:
        for piece, view in zip(self.pieces, self.views(buffer, n_blocks).values()):
            view.fill_(piece.fill)


@dataclass
class Page:
    """Elements [start, end) of `key`'s flat range (whole blocks); their state is in `store`."""

    key: int
    start: int
    end: int
    layout: Layout
    store: torch.Tensor  # uint8 (nbytes,): on the device, or in (pinned) host memory
    on_host: bool = False  # paged and not resident: streamed through the slots

    @property
    def n_blocks(self) -> int:
        return (self.end - self.start) // BLOCK

    @property
    def nbytes(self) -> int:
        return self.n_blocks * self.layout.block_bytes

    def views(self, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.layout.views(self.store if buffer is None else buffer, self.n_blocks)


class StateStore:
    """All the optimizer state of one device, as pages (see Note [paged optimizer state])."""

    def __init__(self, device: torch.device, paged: bool, page_budget_bytes: int | None = None):
        self.device = torch.device(device)
        self.paged = paged
        self.budget = DEFAULT_PAGE_BUDGET_BYTES if page_budget_bytes is None else page_budget_bytes
        self.page_bytes = min(MAX_PAGE_BYTES, self.budget // (2 * N_SLOTS))  # see Note [page size]
        self.pages: dict[int, list[Page]] = {}
        self.slots: list[torch.Tensor] = []  # uint8 (slot_bytes,) on the device, when paged
        self.resident_bytes = 0  # paged: bytes of pages kept on the device (Note [paged optimizer state])
        self._cuda = paged and self.device.type == "cuda"
        if self._cuda:
            self._copy_in = torch.cuda.Stream(self.device)
            self._copy_out = torch.cuda.Stream(self.device)
            self._loaded = [torch.cuda.Event() for _ in range(N_SLOTS)]
            self._written = [torch.cuda.Event() for _ in range(N_SLOTS)]
            self._updated = torch.cuda.Event()
            self._step_done = torch.cuda.Event()

    # -- allocation ---------------------------------------------------------------------------

    def add(self, key: int, n_elements: int, layout: Layout) -> list[Page]:
        """Zero-filled state for elements [0, n_elements) of `key` (a multiple of BLOCK)."""
        if n_elements % BLOCK:
            raise ValueError(f"state for {n_elements} elements: not a multiple of {BLOCK}")
        if self.paged and self.page_bytes < layout.block_bytes:
            raise ValueError(
                f"page_budget_bytes={self.budget} is too small: pages are an eighth of the budget "
                f"and need at least {layout.block_bytes} bytes (one block of {BLOCK} elements)"
            )
        whole = n_elements // BLOCK * layout.block_bytes
        if not self.paged or self._fits_resident(whole):  # one page, on the device
            bounds = [0, n_elements] if n_elements else []
        else:
            per_page = (self.page_bytes // layout.block_bytes) * BLOCK
            bounds = list(range(0, n_elements, per_page)) + [n_elements]
        pinned = self.paged and self.device.type == "cuda"
        pages = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            size = (end - start) // BLOCK * layout.block_bytes
            on_device = not self.paged or self._fits_resident(size)
            home = self.device if on_device else torch.device("cpu")
            store = torch.empty(size, dtype=torch.uint8, device=home, pin_memory=pinned and not on_device)
            page = Page(key, start, end, layout, store, on_host=not on_device)
            layout.fill_(page.store, page.n_blocks)
            if self.paged and on_device:
                self.resident_bytes += size
            pages.append(page)
        self.pages[key] = pages
        return pages

    def _fits_resident(self, size: int) -> bool:
        """Whether a new page of `size` bytes may stay on the device (Note [paged optimizer state])."""
        return self.resident_bytes + size + N_SLOTS * self.page_bytes <= self.budget

    @staticmethod
    def _on_host(page: Page) -> bool:
        return page.on_host

    @property
    def device_bytes(self) -> int:
        """Bytes of state this store holds on the device: all of it, or resident pages and slots."""
        if self.paged:
            return self.resident_bytes + sum(slot.numel() for slot in self.slots)
        return sum(page.nbytes for pages in self.pages.values() for page in pages)

    @property
    def host_bytes(self) -> int:
        return sum(page.nbytes for pages in self.pages.values() for page in pages if self._on_host(page))

    def _ensure_slots(self, pages: list[Page]) -> list[torch.Tensor]:
        n_slots = min(N_SLOTS, len(pages))
        size = max(page.nbytes for page in pages)
        if len(self.slots) >= n_slots and all(slot.numel() >= size for slot in self.slots):
            return self.slots
        self.synchronize()  # the old slots may still be in use by copies of the last step
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        if self._cuda:
            for slot in self.slots:  # see Note [paged optimizer state]
                slot.record_stream(self._copy_in)
                slot.record_stream(self._copy_out)
        return self.slots

    # -- the update loop ----------------------------------------------------------------------

    def stream(self, pages: list[Page]) -> Iterator[tuple[Page, dict[str, torch.Tensor]]]:
        """Yield (page, its state on the device) for each page; changes are kept after each yield.

        The caller enqueues its update of the page on the current stream before asking for the
        next one. See Note [paged optimizer state]."""
        resident = [page for page in pages if not self._on_host(page)]
        pages = [page for page in pages if self._on_host(page)]
        if not pages:
            for page in resident:
                yield page, page.views()
            return
        slots = self._ensure_slots(pages)
        n = len(slots)

        def slot_of(i: int) -> torch.Tensor:
            return slots[i % n][: pages[i].nbytes]

        def load(i: int) -> None:  # page i into slot i % n, whose last page was i - n
            if not self._cuda:
                slot_of(i).copy_(pages[i].store)
                return
            if i >= n:
                self._copy_in.wait_event(self._written[i % n])
            with torch.cuda.stream(self._copy_in):
                slot_of(i).copy_(pages[i].store, non_blocking=True)
            self._loaded[i % n].record(self._copy_in)

        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            self._copy_in.wait_event(self._step_done)  # host pages and slots free from last step
        try:
            for i in range(min(n - 1, len(pages))):
                load(i)
            for page in resident:  # updated while the first host pages are on their way
                yield page, page.views()
            for i, page in enumerate(pages):
                if i + n - 1 < len(pages):
                    load(i + n - 1)
                if self._cuda:
                    compute.wait_event(self._loaded[i % n])
                yield page, page.views(slot_of(i))
                if not self._cuda:
                    page.store.copy_(slot_of(i))
                    continue
                self._updated.record(compute)
                self._copy_out.wait_event(self._updated)
                with torch.cuda.stream(self._copy_out):
                    page.store.copy_(slot_of(i), non_blocking=True)
                self._written[i % n].record(self._copy_out)
        finally:
            if self._cuda:
                self._step_done.record(self._copy_out)

    def synchronize(self) -> None:
        """Wait until host pages hold the last step's state (before the host reads or writes them)."""
        if self._cuda:
            self._step_done.synchronize()

    # -- checkpoints --------------------------------------------------------------------------

    def _parts(self, key: int, start: int, stop: int) -> Iterator[tuple[Piece, torch.Tensor]]:
        """(piece, view) of elements [start, stop) (whole blocks) of key, page by page."""
        for page in self.pages[key]:
            lo, hi = max(start, page.start), min(stop, page.end)
            if lo >= hi:
                continue
            views = page.views()
            for piece in page.layout.pieces:
                scale = piece.per_block / BLOCK
                a, b = int((lo - page.start) * scale), int((hi - page.start) * scale)
                yield piece, views[piece.name][a:b]

    def read(self, key: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """A copy of the state of elements [start, stop) of key (whole blocks), on the CPU."""
        self.synchronize()
        parts: dict[str, list[torch.Tensor]] = {}
        for piece, view in self._parts(key, start, stop):
            parts.setdefault(piece.name, []).append(view)
        return {name: torch.cat([view.cpu() for view in views]) for name, views in parts.items()}

    def write(self, key: int, start: int, stop: int, values: dict[str, torch.Tensor]) -> None:
        """Set the state of elements [start, stop) of key (whole blocks) from `values` (as read)."""
        self.synchronize()
        taken: dict[str, int] = {}
        for piece, view in self._parts(key, start, stop):
            a = taken.get(piece.name, 0)
            view.copy_(values[piece.name][a : a + view.numel()])
            taken[piece.name] = a + view.numel()
