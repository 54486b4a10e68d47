"""BlockPlan: the one data structure every sparse method produces and every kernel backend consumes.

It has the shape of PyTorch FlexAttention's ``BlockMask``: for each (batch, head, query block) the number of key
blocks to compute and their indices. On top of that an optional token permutation (methods that reorder tokens so
that related ones share a block, e.g. DraftAttention) and optional per-head modes (a head computed densely, or
skipped as in Sparse-vDiT).

Conventions (all backends honour them the same way):
- Blocks tile the sequence *after* the permutation; ``kv_indices`` refer to permuted positions. The last block of
  each axis may be partial when ``seq_len`` is not a multiple of the block size: out-of-range tokens are masked
  exactly, never computed.
- ``kv_indices[b, h, m, :kv_num_blocks[b, h, m]]`` are distinct valid block indices (any order); entries past
  ``kv_num_blocks`` are padding and must still lie in ``[0, num_kv_blocks)``.
- The batch and head dimensions of the plan are either the attention's own or 1 (broadcast).
- A head whose mode is ``HEAD_SKIP`` outputs zeros and an LSE of ``-inf`` (Sparse-vDiT's skip rule). A
  ``HEAD_DENSE`` head must list every key block (backends may route it to a dense kernel).
- Text rows and columns are always attended: plan builders guarantee it (``add_text``); the plan stores no text.
- A plan is immutable: its tensors are never modified in place once it is built. Data derived from it (a backend's
  preprocessed form, the density) is therefore computed once and kept in the plan's private cache
  (:meth:`BlockPlan.derived`), so it lives exactly as long as the plan and is never shared with another plan.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from dit_sparse.layout import TokenLayout

HEAD_PLANNED = 0
HEAD_DENSE = 1
HEAD_SKIP = 2

T = TypeVar("T")

_OWNERS: weakref.WeakValueDictionary[int, BlockPlan] = weakref.WeakValueDictionary()
"""Live plans by ``id(kv_indices)`` (:meth:`BlockPlan.owning`)."""


def num_blocks(n: int, block: int) -> int:
    """Blocks of size ``block`` needed to cover ``n`` tokens."""
    return -(-n // block)


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Which key blocks each query block attends.

    Attributes:
        seq_len: N, the sequence length (queries and keys: self-attention).
        block_q, block_kv: block sizes in tokens.
        kv_num_blocks: int32 ``[B, H, Mq]``.
        kv_indices: int32 ``[B, H, Mq, Mk]`` (``Mq = ceil(N / block_q)``, ``Mk = ceil(N / block_kv)``).
        perm: optional int64 ``[N]``; attention runs on ``x[..., perm, :]`` and the output is restored with ``inv_perm``.
        inv_perm: ``argsort(perm)``, filled in automatically.
        head_mode: optional tuple with one of HEAD_PLANNED / HEAD_DENSE / HEAD_SKIP per head (kept on the host so
            that routing decisions need no device sync).
        density_hint: optional host-side estimate of the fraction of key blocks listed (e.g. a dynamic method's
            target density). Backends use it for tuning choices only (the Triton autotune band) instead of reading
            the plan's device tensors, so a plan rebuilt every call costs no device->host sync. Never used for
            results or reports (:meth:`density` is always measured).

    Besides these fields a plan holds a private cache of derived data (:meth:`derived`); it is not part of the
    plan's identity (equality is identity, ``repr`` omits it) and ``to`` / ``dataclasses.replace`` start a new one.
    """

    seq_len: int
    block_q: int
    block_kv: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    perm: torch.Tensor | None = None
    inv_perm: torch.Tensor | None = None
    head_mode: tuple[int, ...] | None = None
    density_hint: float | None = None
    _derived: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mq, mk = self.num_q_blocks, self.num_kv_blocks
        if self.block_q < 1 or self.block_kv < 1:
            raise ValueError(f"block sizes must be >= 1, got block_q={self.block_q}, block_kv={self.block_kv}")
        if self.kv_num_blocks.dim() != 3 or self.kv_num_blocks.shape[-1] != mq:
            raise ValueError(
                f"kv_num_blocks must be [B, H, {mq}] for seq_len={self.seq_len}, block_q={self.block_q}; "
                f"got {tuple(self.kv_num_blocks.shape)}"
            )
        if self.kv_indices.shape != (*self.kv_num_blocks.shape, mk):
            raise ValueError(
                f"kv_indices must be {(*self.kv_num_blocks.shape, mk)} (Mk = ceil(seq_len / block_kv)); "
                f"got {tuple(self.kv_indices.shape)}"
            )
        if self.kv_num_blocks.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise ValueError("kv_num_blocks and kv_indices must be int32 (use BlockPlan.from_block_mask)")
        if self.density_hint is not None and not 0.0 <= self.density_hint <= 1.0:
            raise ValueError(f"density_hint must lie in [0, 1], got {self.density_hint!r}")
        if self.perm is not None:
            if self.perm.shape != (self.seq_len,):
                raise ValueError(f"perm must have shape ({self.seq_len},), got {tuple(self.perm.shape)}")
            if self.inv_perm is None:
                object.__setattr__(self, "inv_perm", torch.argsort(self.perm))
        if not torch.compiler.is_compiling():
            _OWNERS[id(self.kv_indices)] = self
        if self.head_mode is not None:
            if self.kv_num_blocks.shape[1] not in (1, len(self.head_mode)):
                raise ValueError(f"head_mode has {len(self.head_mode)} heads but the plan has {self.heads}")
            if any(m not in (HEAD_PLANNED, HEAD_DENSE, HEAD_SKIP) for m in self.head_mode):
                raise ValueError(f"head_mode entries must be HEAD_PLANNED, HEAD_DENSE or HEAD_SKIP: {self.head_mode}")

    @staticmethod
    def owning(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> BlockPlan | None:
        """The live plan whose tensors these are (a custom op given a plan's tensors finds its cache), else None."""
        plan = _OWNERS.get(id(kv_indices))
        if plan is None or plan.kv_indices is not kv_indices or plan.kv_num_blocks is not kv_num_blocks:
            return None
        return plan

    # ------------------------------------------------------------------ shape
    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_kv)

    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``, computed on the first request for ``key`` and then kept with this plan (and only this one).

        For data that depends on the plan alone (plus what ``key`` names, e.g. a head count): a backend's
        preprocessed lists, the density. Keys are namespaced by their user (``("triton", heads)``).
        """
        try:
            return self._derived[key]
        except KeyError:
            value = self._derived[key] = build()
            return value

    # ------------------------------------------------------------ builders
    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        seq_len: int,
        block_q: int,
        block_kv: int | None = None,
        *,
        perm: torch.Tensor | None = None,
        head_mode: tuple[int, ...] | None = None,
        inv_perm: torch.Tensor | None = None,
        density_hint: float | None = None,
    ) -> BlockPlan:
        """Plan from a boolean block mask ``[B, H, Mq, Mk]`` (or ``[H, Mq, Mk]`` / ``[Mq, Mk]``); no host sync.

        ``inv_perm`` (``argsort(perm)``, computed when omitted) lets callers that rebuild plans with a cached
        permutation skip the sort; ``density_hint``: see the class attributes.
        """
        block_kv = block_q if block_kv is None else block_kv
        while block_mask.dim() < 4:
            block_mask = block_mask.unsqueeze(0)
        block_mask = block_mask.bool()
        kv_num = block_mask.sum(-1, dtype=torch.int32)
        # stable sort puts the selected blocks first, in ascending order
        kv_idx = torch.argsort((~block_mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
        return cls(
            seq_len, block_q, block_kv, kv_num, kv_idx, perm=perm, inv_perm=inv_perm, head_mode=head_mode,
            density_hint=density_hint,
        )  # fmt: skip

    @classmethod
    def full(
        cls, seq_len: int, block_q: int, block_kv: int | None = None, *, device: torch.device | str | None = None
    ) -> BlockPlan:
        """Every query block attends every key block (dense attention through the sparse machinery)."""
        block_kv = block_q if block_kv is None else block_kv
        mask = torch.ones(num_blocks(seq_len, block_q), num_blocks(seq_len, block_kv), dtype=torch.bool, device=device)
        return cls.from_block_mask(mask, seq_len, block_q, block_kv, density_hint=1.0)

    def to(self, device: torch.device | str) -> BlockPlan:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            kv_num_blocks=move(self.kv_num_blocks),
            kv_indices=move(self.kv_indices),
            perm=move(self.perm),
            inv_perm=move(self.inv_perm),
        )

    # ------------------------------------------------------------ queries
    def block_mask(self) -> torch.Tensor:
        """Boolean ``[B, H, Mq, Mk]``: True where a (query block, key block) pair is computed."""
        mk = self.num_kv_blocks
        valid = torch.arange(mk, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        # padding entries may repeat a selected index: reduce with max so they never clear it
        hits = torch.zeros(*self.kv_num_blocks.shape, mk, dtype=torch.int8, device=self.device)
        hits.scatter_reduce_(-1, self.kv_indices.long(), valid.to(torch.int8), reduce="amax")
        mask = hits.bool()
        if self.head_mode is not None:
            skip = torch.tensor([m == HEAD_SKIP for m in self.head_mode], device=self.device)
            mask = mask & ~skip.view(1, -1, 1, 1)
        return mask

    def density(self) -> float:
        """Fraction of the N×N attention matrix computed (exact token counts, tails included; skipped heads = 0)."""
        return float(self.density_tensor())

    def density_tensor(self) -> torch.Tensor:
        """:meth:`density` as a 0-d float tensor on the plan's device (no host sync; computed once per plan)."""
        return self.derived("density", self._measure_density)

    def _measure_density(self) -> torch.Tensor:
        mask = self.block_mask().float()
        n = self.seq_len
        rows = torch.full((self.num_q_blocks,), float(self.block_q), device=self.device)
        rows[-1] = n - self.block_q * (self.num_q_blocks - 1)
        cols = torch.full((self.num_kv_blocks,), float(self.block_kv), device=self.device)
        cols[-1] = n - self.block_kv * (self.num_kv_blocks - 1)
        return torch.einsum("bhqk,q,k->bh", mask, rows, cols).mean() / (n * n)

    def to_dense_mask(self) -> torch.Tensor:
        """Boolean ``[B, H, N, N]`` in the ORIGINAL token order (tests and small inputs only)."""
        n = self.seq_len
        mask = self.block_mask()
        mask = mask.repeat_interleave(self.block_q, dim=2)[:, :, :n]
        mask = mask.repeat_interleave(self.block_kv, dim=3)[:, :, :, :n]
        if self.perm is not None:
            inv = self.inv_perm
            mask = mask[:, :, inv][:, :, :, inv]
        return mask

    # ------------------------------------------------------------ checks
    def check(self) -> BlockPlan:
        """Validate the plan's contents (syncs with the device: call once when a plan is built, not per call).

        Raises ValueError when an index is out of range, repeated, or a query block of a computed head has no key
        block (its softmax would be empty).
        """
        mk = self.num_kv_blocks
        heads_computed = torch.ones(self.heads, dtype=torch.bool, device=self.device)
        if self.head_mode is not None and self.heads == len(self.head_mode):
            heads_computed = torch.tensor([m != HEAD_SKIP for m in self.head_mode], device=self.device)
        if bool(((self.kv_num_blocks < 0) | (self.kv_num_blocks > mk)).any()):
            raise ValueError(f"kv_num_blocks must lie in [0, {mk}]")
        if bool(((self.kv_indices < 0) | (self.kv_indices >= mk)).any()):
            raise ValueError(f"kv_indices must lie in [0, {mk}) (padding entries too)")
        empty = (self.kv_num_blocks == 0) & heads_computed.view(1, -1, 1)
        if bool(empty.any()):
            b, h, m = (int(x) for x in empty.nonzero()[0])
            raise ValueError(
                f"query block {m} (batch {b}, head {h}) attends no key block: every computed query block needs at "
                "least one (add its diagonal block, or mark the head HEAD_SKIP)"
            )
        valid = torch.arange(mk, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        counts = torch.zeros(*self.kv_num_blocks.shape, mk, dtype=torch.int32, device=self.device)
        counts.scatter_add_(-1, self.kv_indices.long(), valid.to(torch.int32))
        if bool((counts > 1).any()):
            raise ValueError("kv_indices repeats a key block within one query block's list")
        if self.head_mode is not None and HEAD_DENSE in self.head_mode:
            dense = torch.tensor([m == HEAD_DENSE for m in self.head_mode], device=self.device)
            if bool((self.kv_num_blocks[:, dense] != mk).any()):
                raise ValueError("a HEAD_DENSE head must list every key block")
        if self.perm is not None:
            ok = torch.zeros(self.seq_len, dtype=torch.bool, device=self.device)
            ok[self.perm] = True
            if not bool(ok.all()):
                raise ValueError("perm is not a permutation of range(seq_len)")
        return self

    def check_inputs(self, batch: int, heads: int, seq_len: int) -> None:
        """Shape check against an attention call (no device sync)."""
        if seq_len != self.seq_len:
            raise ValueError(f"the plan was built for seq_len={self.seq_len} but q/k/v have {seq_len} tokens")
        if self.batch not in (1, batch):
            raise ValueError(
                f"the plan has batch {self.batch}; q/k/v have batch {batch} (plans broadcast only batch 1)"
            )
        if self.heads not in (1, heads):
            raise ValueError(f"the plan has {self.heads} heads; q/k/v have {heads} (plans broadcast only 1 head)")
        if self.head_mode is not None and len(self.head_mode) != heads:
            raise ValueError(f"head_mode lists {len(self.head_mode)} heads; q/k/v have {heads}")


def add_text(block_mask: torch.Tensor, layout: TokenLayout, block_q: int, block_kv: int) -> torch.Tensor:
    """Mark every block pair that touches a text row or a text column (text is always attended fully).

    ``block_mask`` is ``[..., Mq, Mk]`` in the layout's token order (no permutation); returns a new mask.
    """
    if layout.text_len == 0:
        return block_mask
    start, end = layout.text_range
    mq, mk = block_mask.shape[-2:]
    qb = torch.arange(mq, device=block_mask.device)
    kb = torch.arange(mk, device=block_mask.device)
    text_q = (qb * block_q < end) & ((qb + 1) * block_q > start)
    text_k = (kb * block_kv < end) & ((kb + 1) * block_kv > start)
    return block_mask | text_q[:, None] | text_k[None, :]


def token_to_block_mask(token_mask: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Block mask ``[..., Mq, Mk]`` that covers a token mask ``[..., N, N]``: a block pair is kept if any of its
    token pairs is (exact superset; tails padded)."""
    n_q, n_k = token_mask.shape[-2:]
    mq, mk = num_blocks(n_q, block_q), num_blocks(n_k, block_kv)
    padded = torch.zeros(
        *token_mask.shape[:-2], mq * block_q, mk * block_kv, dtype=torch.bool, device=token_mask.device
    )
    padded[..., :n_q, :n_k] = token_mask
    return padded.view(*token_mask.shape[:-2], mq, block_q, mk, block_kv).any(dim=-1).any(dim=-2)
