"""The decode batch's tensors: one KV slot per row, each row with its own length.

Row ``r`` keeps its tokens' keys and values at positions ``[0, length_r)`` of
its slot, in per-layer buffers of ``[rows, heads, positions, dim]``. A decode
step feeds one token per row; each row writes its token at its own position and
attends to its own ``[0, length]`` through an additive mask, so a row computes
what it would alone, whatever else is in the batch. Every layer keeps the whole
history; a sliding-window layer gets a mask of its own that opens only the last
``window`` positions (:mod:`llm_stream.model.attention`), so the slot layout is
the same for every attention kind. Every input of a
step (token ids, positions, mask, cache) is a slice of a buffer that never
moves: the same step can be captured once as a CUDA graph and replayed.

Rows join in the first free slots, copied from their prefill's cache; a leaving
row's slot is filled by moving the last row into it, so live rows are always
slots ``[0, n)``. On the GPU the buffers are allocated once, as large as the
KV budget allows; on the CPU they grow as needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from llm_stream.model.attention import AttentionLayout
from llm_stream.model.transfer import Transfer

# Buffers' position counts are kept a multiple of this (aligned mask rows for the
# attention kernels).
POSITION_ALIGN = 16
# Spare positions and rows reserved when a growable batch grows.
_HEADROOM = 64


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class LayerShape:
    """One layer's cached keys and values: KV heads, their widths (which differ in
    multi-head latent attention), dtype."""

    heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        return self.heads * (self.key_dim + self.value_dim) * size


def probe_layers(model: Any, device: torch.device) -> list[LayerShape]:
    """The keys/values shape of every cache layer, from a one-token forward.

    Not for the CPU at load time: a forward on the loading thread leaves an
    OpenMP team behind that slowed every later forward on the scheduler thread
    by about a third (measured on 2 cores); there the shapes come from the
    first prefill instead (:meth:`SlotBatch.join`).
    """
    cache = full_history_cache()
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), cache=cache)
    return cache_shapes(cache)


def full_history_cache() -> DynamicCache:
    """A transformers cache whose every layer keeps all its tokens, sliding-window ones
    too: prompts are prefilled into it and copied into slots. The model still masks
    windowed layers by their window (from its config), whatever the cache keeps."""
    return DynamicCache()


def cache_shapes(cache: DynamicCache) -> list[LayerShape]:
    shapes = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None
        assert layer.values is not None
        keys, values = layer.keys, layer.values
        shapes.append(
            LayerShape(int(keys.shape[1]), int(keys.shape[-1]), int(values.shape[-1]), keys.dtype)
        )
    return shapes


@dataclass(frozen=True)
class RowMoves:
    """Rows moved into freed slots: ``(target, source)`` pairs, and the same as index
    tensors on the device, made once for every per-row tensor that has to follow."""

    pairs: list[tuple[int, int]]
    targets: torch.Tensor
    sources: torch.Tensor

    def apply(self, tensor: torch.Tensor) -> None:
        """Copy rows ``sources`` of ``tensor`` (its first dimension) into ``targets``."""
        tensor.index_copy_(0, self.targets, tensor.index_select(0, self.sources))


class DecodeView:
    """What the next forward covers, shared by the slot layers.

    A decode step: slots ``[0, rows)``, one token each, written at ``positions``
    (one per row). A staged prompt chunk (``staged`` True): the staging slot only,
    its tokens written at ``positions`` (one per token).
    """

    def __init__(self) -> None:
        self.rows = 0
        self.width = 0
        self.positions: torch.Tensor | None = None
        self.staged = False
        self.staging_row = 0


class SlotLayer(DynamicLayer):
    """One layer's slots; ``update`` writes each row's new token at its own position."""

    def __init__(self, view: DecodeView, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._view = view
        self.slab_keys = keys
        self.slab_values = values
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view = self._view
        assert view.positions is not None
        if view.staged:
            row = slice(view.staging_row, view.staging_row + 1)
            self.slab_keys[row].index_copy_(2, view.positions, key_states)
            self.slab_values[row].index_copy_(2, view.positions, value_states)
            self.keys = self.slab_keys[row, :, : view.width]
            self.values = self.slab_values[row, :, : view.width]
            return self.keys, self.values
        assert key_states.shape[-2] == 1, "one token per row"
        rows, width = view.rows, view.width
        index = view.positions.view(rows, 1, 1, 1)
        self.slab_keys[:rows].scatter_(2, index.expand(key_states.shape), key_states)
        self.slab_values[:rows].scatter_(2, index.expand(value_states.shape), value_states)
        self.keys = self.slab_keys[:rows, :, :width]
        self.values = self.slab_values[:rows, :, :width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._view.width


MaskArgument = torch.Tensor | dict[str, torch.Tensor]


class SlotBatch:
    """Every per-row tensor of the decode batch, in slot order ``[0, rows)``."""

    def __init__(
        self,
        layers: Sequence[LayerShape] | None,
        rows: int,
        positions: int,
        device: torch.device,
        *,
        growable: bool,
        dtype: torch.dtype | None = None,
        staging: int = 0,
        layout: AttentionLayout | None = None,
    ) -> None:
        """``layers`` None: the slabs take their shapes from the first rows to join.

        ``staging``: a static batch gets one more slot, beyond every decode row, where
        prompts are fed in chunks of up to this many tokens by fixed-shape forwards
        (:meth:`chunk_inputs`) before they join (:meth:`join_staged`); 0: none.
        ``layout``: the model's attention kinds (None: full attention on every layer);
        each distinct window gets its own mask.
        """
        self.device = device
        self.growable = growable
        self.staging = staging
        self.layout = layout
        self.windows: tuple[int | None, ...] = layout.distinct_windows if layout else (None,)
        self.shapes = list(layers or [])
        self.transfer = Transfer(device)
        self.view = DecodeView()
        # Keys of the rows, and how many tokens each has in its slot (host copies:
        # the step's shape is chosen without asking the device).
        self.keys: list[int] = []
        self.lengths: list[int] = []
        self.mask_dtype = self.shapes[0].dtype if self.shapes else (dtype or torch.float32)
        self.closed = torch.finfo(self.mask_dtype).min
        self.slabs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ids = torch.zeros(0, dtype=torch.long, device=device)
        self.pos = torch.zeros(0, dtype=torch.long, device=device)
        # Per row, one additive mask [rows, 1, 1, positions] per window.
        self.masks = {
            window: torch.zeros((0, 1, 1, 0), dtype=self.mask_dtype, device=device)
            for window in self.windows
        }
        self.cache = Cache(layers=[])
        self._allocate(rows, round_up(positions + 1, POSITION_ALIGN))
        width = self.width
        # A staged chunk's inputs, one upload: its token ids, then its start and the
        # index of its last real token; and the positions and masks made from them.
        self.chunk_io = torch.zeros(staging + 2, dtype=torch.long, device=device)
        self.chunk_pos = torch.zeros(staging, dtype=torch.long, device=device)
        self.chunk_masks = {
            window: torch.zeros((1, 1, staging, width), dtype=self.mask_dtype, device=device)
            for window in self.windows
        }
        self._columns = torch.arange(width, device=device)
        self._offsets = torch.arange(staging, device=device)

    # -- buffers ---------------------------------------------------------------

    @property
    def capacity_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        """Positions a slot's buffers have."""
        return int(self.masks[self.windows[0]].shape[-1])

    @property
    def capacity_positions(self) -> int:
        """Tokens one slot holds (one position stays free for the token being fed)."""
        return self.width - 1

    @property
    def rows(self) -> int:
        return len(self.keys)

    def _allocate(self, rows: int, width: int) -> None:
        """(Re)allocate every buffer; the live rows' content is kept.

        Attention reads every slot up to the step's width, masked or not, so every
        position it can read must hold a finite number (NaN times a zero weight is
        still NaN). A static batch starts all zeros. A growable one only copies its
        live rows and zeroes their new positions: a row that joins later zeroes the
        rest of its own slot (:meth:`join`); zeroing whole slabs at every growth cost
        a sixth of a 64-stream run on 2 cores.
        """
        old_slabs, old_ids, old_pos, old_masks = self.slabs, self.ids, self.pos, self.masks
        fresh = torch.empty if self.growable else torch.zeros
        slots = rows + (1 if self.staging else 0)  # the staging slot is the last
        self.slabs = [
            (
                fresh((slots, s.heads, width, s.key_dim), dtype=s.dtype, device=self.device),
                fresh((slots, s.heads, width, s.value_dim), dtype=s.dtype, device=self.device),
            )
            for s in self.shapes
        ]
        self.view.staging_row = rows
        self.ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.masks = {}
        for window in self.windows:
            mask = torch.full(
                (rows, 1, 1, width), self.closed, dtype=self.mask_dtype, device=self.device
            )
            # A free row attends to its position 0 only: padded rows of a step stay finite.
            mask[:, :, :, 0] = 0
            self.masks[window] = mask
        n, kept = self.rows, min(width, int(old_masks[self.windows[0]].shape[-1]))
        if n:
            for (keys, values), (old_keys, old_values) in zip(self.slabs, old_slabs, strict=True):
                for slab, old in ((keys, old_keys), (values, old_values)):
                    slab[:n, :, :kept] = old[:n, :, :kept]
                    slab[:n, :, kept:].zero_()
            self.ids[:n] = old_ids[:n]
            self.pos[:n] = old_pos[:n]
            for window, mask in self.masks.items():
                mask[:n, :, :, :kept] = old_masks[window][:n, :, :, :kept]
        self.cache = Cache(
            layers=[SlotLayer(self.view, keys, values) for keys, values in self.slabs]
        )

    def ensure(self, rows: int, tokens: int) -> None:
        """Room for ``rows`` rows of ``tokens`` tokens each, plus the one each feeds next.

        A growable batch grows; a static one raises (its budget never lets this happen).
        """
        width = tokens + 1
        if rows <= self.capacity_rows and width <= self.width:
            return
        if not self.growable:
            raise RuntimeError(
                f"{rows} rows of {tokens} tokens exceed the static KV cache of "
                f"{self.capacity_rows} x {self.capacity_positions}"
            )
        new_rows = self.capacity_rows
        if rows > new_rows:
            new_rows = max(rows, 2 * new_rows)
        new_width = self.width
        if width > new_width:
            new_width = round_up(width + max(_HEADROOM, width // 2), POSITION_ALIGN)
        self._allocate(new_rows, new_width)

    # -- masks ---------------------------------------------------------------------

    def _opened(
        self, columns: torch.Tensor, last: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """The additive mask of queries at positions ``last`` (a column) over ``columns``:
        every position up to the query's own, or only the last ``window`` of them."""
        opened = columns <= last
        if window is not None:
            opened &= columns > last - window
        return torch.where(opened, 0.0, self.closed).to(self.mask_dtype)

    def _mask_argument(self, masks: dict[int | None, torch.Tensor]) -> MaskArgument:
        """What the model takes as ``attention_mask``: one mask when every layer is of one
        kind, else one per layer kind, keyed as the config's ``layer_types`` name them."""
        if self.layout is None or len(self.layout.windows) == 1:
            return masks[self.windows[0]]
        return {kind: masks[window] for kind, window in self.layout.windows.items()}

    # -- a decode step ------------------------------------------------------------

    def bind(self, rows: int, width: int) -> None:
        """The next decode forward covers slots ``[0, rows)`` and positions ``[0, width)``."""
        self.view.rows, self.view.width = rows, width
        self.view.positions = self.pos[:rows]
        self.view.staged = False

    def decode_inputs(self, rows: int, width: int) -> dict[str, Any]:
        """The model's keyword arguments for a decode step over ``rows`` x ``width``."""
        self.bind(rows, width)
        masks = {window: mask[:rows, :, :, :width] for window, mask in self.masks.items()}
        return {
            "input_ids": self.ids[:rows].view(rows, 1),
            "position_ids": self.pos[:rows].view(rows, 1),
            "attention_mask": self._mask_argument(masks),
            "cache": self.cache,
            "use_cache": True,
        }

    def advance(self, tokens: torch.Tensor) -> None:
        """After a decode step: the live rows feed ``tokens`` next, one position on.

        Each row's new position opens; a windowed mask also closes the position that
        falls out of its window (none while the row is shorter than the window).
        """
        n = self.rows
        self.ids[:n].copy_(tokens)
        self.pos[:n].add_(1)
        positions = self.pos[:n].view(n, 1, 1, 1)
        for window, mask in self.masks.items():
            mask[:n].scatter_(3, positions, 0.0)
            if window is not None:
                leaving = positions - window
                value = torch.where(leaving >= 0, self.closed, 0.0).to(self.mask_dtype)
                mask[:n].scatter_(3, leaving.clamp(min=0), value)
        self.lengths = [length + 1 for length in self.lengths]

    # -- prompts fed in the staging slot -------------------------------------------------

    def stage(self, tokens: Sequence[int], start: int) -> None:
        """The next staged chunk: ``tokens`` at positions ``start`` onwards (one upload)."""
        values = [*tokens, *([0] * (self.staging - len(tokens))), start, len(tokens) - 1]
        self.chunk_io.copy_(self.transfer.host(values, torch.long), non_blocking=True)

    def chunk_inputs(self, tokens: int, width: int) -> dict[str, Any]:
        """The model's keyword arguments for a staged chunk of ``tokens`` (padded) tokens
        attending over positions ``[0, width)``: what a prefill graph captures.

        Positions and the causal masks are made on the device from the uploaded start,
        so a replay needs nothing from the host but :meth:`stage`'s one copy.
        """
        positions = self.chunk_pos[:tokens]
        # Padding past the slot's end goes to its last position, which no prompt reaches
        # (a prompt leaves room for at least one generated token).
        last = self.width - 1
        positions.copy_((self.chunk_io[-2] + self._offsets[:tokens]).clamp(max=last))
        columns = self._columns[:width].unsqueeze(0)
        masks = {}
        for window, mask in self.chunk_masks.items():
            mask[0, 0, :tokens, :width].copy_(self._opened(columns, positions.unsqueeze(1), window))
            masks[window] = mask[:, :, :tokens, :width]
        view = self.view
        view.staged, view.width, view.positions = True, width, positions
        return {
            "input_ids": self.chunk_io[:tokens].view(1, tokens),
            "position_ids": positions.view(1, tokens),
            "attention_mask": self._mask_argument(masks),
            "cache": self.cache,
            "use_cache": True,
            "logits_to_keep": self.chunk_io[-1:],
        }

    def join_staged(self, key: int, length: int, first_token: torch.Tensor) -> slice:
        """The prompt in the staging slot (``length`` tokens) joins as a decode row."""
        first = self.rows
        self.ensure(first + 1, length)
        staged = self.view.staging_row
        destinations, sources = [], []
        for keys, values in self.slabs:
            for slab in (keys, values):
                destinations.append(slab[first, :, :length])
                sources.append(slab[staged, :, :length])
        torch._foreach_copy_(destinations, sources)
        return self._open(slice(first, first + 1), [key], [length], first_token)

    def _open(
        self, slots: slice, keys: Sequence[int], lengths: Sequence[int], first_tokens: torch.Tensor
    ) -> slice:
        """Rows whose caches are in place start decoding: positions, masks, first tokens."""
        length_tensor = self.transfer.to_device(list(lengths), torch.long)
        self.pos[slots] = length_tensor
        columns = torch.arange(self.width, device=self.device).unsqueeze(0)
        for window, mask in self.masks.items():
            mask[slots, 0, 0, :] = self._opened(columns, length_tensor.unsqueeze(1), window)
        self.ids[slots] = first_tokens
        self.keys.extend(keys)
        self.lengths.extend(lengths)
        return slots

    # -- rows joining and leaving ----------------------------------------------------

    def join(
        self,
        keys: Sequence[int],
        prefill: DynamicCache,
        lengths: Sequence[int],
        first_tokens: torch.Tensor,
        *,
        right_padded: bool = False,
    ) -> slice:
        """Add rows from a prefill cache whose rows are left-padded to a common width.

        Returns the slots they took. Row ``i`` keeps its ``lengths[i]`` real
        tokens, which end at the prefill cache's last position; or, ``right_padded``,
        start at its first (what follows a row's length in its slot is never read).
        """
        first, count = self.rows, len(keys)
        if not self.shapes:  # the first rows ever: now the layers' shapes are known
            self.shapes = cache_shapes(prefill)
            self._allocate(self.capacity_rows, self.width)
        self.ensure(first + count, max(lengths))
        slots = slice(first, first + count)
        padded = max(lengths)
        shift = None
        if not right_padded and any(length != padded for length in lengths):
            # Where row i's j-th real token sits in the left-padded prefill cache.
            offsets = [padded - length for length in lengths]
            columns = torch.arange(padded, device=self.device).unsqueeze(0)
            shift = (columns + self.transfer.to_device(offsets, torch.long).unsqueeze(1)).clamp(
                max=padded - 1
            )
        for (keys_slab, values_slab), layer in zip(self.slabs, prefill.layers, strict=True):
            assert isinstance(layer, DynamicLayer)
            for slab, part in ((keys_slab, layer.keys), (values_slab, layer.values)):
                assert part is not None
                if shift is not None:
                    index = shift[:, None, :, None].expand(
                        count, part.shape[1], padded, part.shape[3]
                    )
                    slab[slots, :, :padded] = part.gather(2, index)
                else:
                    slab[slots, :, :padded] = part
                if self.growable:  # the rest of a fresh slot may be uninitialised memory
                    slab[slots, :, padded:].zero_()
        return self._open(slots, keys, lengths, first_tokens)

    def remove(self, keys: Sequence[int]) -> RowMoves | None:
        """Drop these rows; the last rows move into the freed slots.

        Returns the moves made (None when no row moved), for state kept elsewhere by slot.
        """
        gone = set(keys)
        drop = [i for i, key in enumerate(self.keys) if key in gone]
        if not drop:
            return None
        rows = self.rows
        left = rows - len(drop)
        holes = [i for i in drop if i < left]
        movers = [i for i in range(left, rows) if self.keys[i] not in gone]
        moves = None
        if holes:
            moves = RowMoves(
                list(zip(holes, movers, strict=True)),
                self.transfer.to_device(holes, torch.long),
                self.transfer.to_device(movers, torch.long),
            )
            width = max(self.lengths[i] for i in movers) + 1
            for keys_slab, values_slab in self.slabs:
                moves.apply(keys_slab[:, :, :width])
                moves.apply(values_slab[:, :, :width])
            for tensor in (self.ids, self.pos, *self.masks.values()):
                moves.apply(tensor)
            for target, source in moves.pairs:
                self.keys[target] = self.keys[source]
                self.lengths[target] = self.lengths[source]
        del self.keys[left:]
        del self.lengths[left:]
        self.clear(slice(left, rows))
        return moves

    def clear(self, slots: slice) -> None:
        """Free slots: position 0, attending to that position only."""
        self.pos[slots] = 0
        self.ids[slots] = 0
        for mask in self.masks.values():
            mask[slots] = self.closed
            mask[slots, :, :, 0] = 0

    def reset(self) -> None:
        self.keys, self.lengths = [], []
        self.clear(slice(0, self.capacity_rows))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, copied without waiting for the device (see transfer)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def forward_prompts(
    model: Any, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill whole prompts as one left-padded batch; returns its cache and last logits."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = to_device(ids, device), to_device(mask, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = full_history_cache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, out.logits[:, -1, :]


@dataclass
class PartialPrompt:
    """A prompt fed in chunks: its one-row cache, and how many tokens it holds."""

    cache: DynamicCache
    length: int


def start_prompt(
    model: Any, chunk: Sequence[int], device: torch.device
) -> tuple[PartialPrompt, torch.Tensor]:
    """Feed the first chunk of a long prompt; returns its state and last logits."""
    cache, logits = forward_prompts(model, [chunk], 0, device)
    return PartialPrompt(cache, len(chunk)), logits


def extend_prompt(
    model: Any, partial: PartialPrompt, chunk: Sequence[int], device: torch.device
) -> torch.Tensor:
    """Feed a further chunk (chunked prefill); returns last logits."""
    ids = to_device(torch.tensor([list(chunk)], dtype=torch.long), device)
    start = partial.length
    positions = to_device(torch.arange(start, start + len(chunk)).unsqueeze(0), device)
    out = model(
        input_ids=ids,
        position_ids=positions,
        cache=partial.cache,
        use_cache=True,
        logits_to_keep=1,
    )
    partial.length += len(chunk)
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits


def extend_prompts(
    model: Any,
    cache: DynamicCache,
    parts: Sequence[Sequence[int]],
    start: int,
    *,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Feed each row its next tokens after the ``start`` tokens its row of ``cache``
    holds, as one right-padded forward; returns each row's last logits, [rows, vocab].

    Right padding keeps each row's tokens contiguous from position 0, so a
    sliding window counts real tokens only; the pads come after a row's last token
    and, attention being causal, change nothing before it.
    """
    rows, width = len(parts), max(len(p) for p in parts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    for row, part in enumerate(parts):
        ids[row, : len(part)] = torch.tensor(list(part), dtype=torch.long)
    positions = torch.arange(start, start + width).expand(rows, width)
    lasts = sorted({len(p) - 1 for p in parts})
    out = model(
        input_ids=to_device(ids, device),
        position_ids=to_device(positions.contiguous(), device),
        cache=cache,
        use_cache=True,
        logits_to_keep=to_device(torch.tensor(lasts), device),
    )
    pick = to_device(torch.tensor([lasts.index(len(p) - 1) for p in parts]), device)
    logits: torch.Tensor = out.logits[torch.arange(rows, device=device), pick]
    return logits
