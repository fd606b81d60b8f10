"""Context parallelism: one patched model's sequence split over the processes of a torch.distributed group.

``attnpatch.apply(model, parallel=ContextParallel(ulysses=U, ring=R))`` (or ``parallel={"ulysses": 2}``)
does three things, all recorded in the patch's `UndoLog` and undone by ``remove()``:

1. **Split and gather.** The model's sequence is split once where it enters the blocks and gathered once
   at the output, following a *plan* (`attnpatch.parallel_plan`: a diffusers model's ``_cp_plan``, or a
   recipe's ``parallel:`` section). Every tensor aligned with the sequence (rotary tables, masks,
   per-token modulation) is split the same way. The hooks live in ``attnpatch.adapters.sequence_split``.
2. **Distributed attention.** Every attention site of the model gets a planner in the router
   (`attnpatch.router.SITE_PLANNERS`): while the model is inside its sharded region, a call runs as

   * **Ulysses** (U > 1): an all-to-all turns this process's sequence shard of all heads into the whole
     sequence of H/U heads; attention runs locally; a second all-to-all turns it back.
   * **ring** (R > 1): key/value blocks travel around a ring of R processes (point-to-point, the next
     block in flight while the current one is computed); the partial outputs are merged by their
     log-sum-exp in float32.
   * both (U × R = the group size): Ulysses inside groups of U neighbouring processes, ring across the
     R groups.

   The local attention of each step is an ordinary `attnpatch.router.route` call with the site's own
   settings, so auto, recipes, lossy opt-in, ``use_backend`` and the report work per process as on one
   GPU. Ring steps ask for the log-sum-exp (``return_lse=True``): backends that cannot return it are not
   eligible there, with the router's usual reasons.
3. **Checks.** What cannot be computed exactly is refused with a `ContextParallelError` that names the
   site and the fix: dropout, gradients, sliding windows inside a ring, causal cross-attention, masks that
   do not say how a query attends other processes' keys, models with unrouted attention.

Conventions. Process ``i`` of the context-parallel group (its rank in that group) is ``(g, u) =
divmod(i, U)``: ulysses index ``u`` (the U processes of one group are neighbours, as on one host) and
ring index ``g``. A split tensor of length L is divided so that every process gets ``L // W`` or one more
token (W = U × R); lengths that do not divide are served exactly (the lengths of the other processes are
exchanged per call, a small all-gather, and announced once in the log). Cross-attention keys and values
(the text) stay whole on every process unless the plan splits them. With a ``causal`` plan and R > 1
the sequence is split in the load-balanced ("zigzag") order: it is cut into 2R chunks and ring group g
holds chunks g and 2R-1-g, so every ring step does the same amount of work.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .parallel_plan import DENOISERS, ContextParallelError, SequencePlan, from_cp_plan

logger = logging.getLogger("attnpatch")

__all__ = ["ContextParallel", "ContextParallelError", "ContextParallelAttention", "attach", "resolve_groups",
           "SequenceLayout", "merge_partial"]




# -- the configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContextParallel:
    """How to split one model's sequence over the processes of a torch.distributed group.

    * ``ulysses`` — U: processes that exchange sequence shards for head shards (all-to-all). The heads
      of each attention call must divide by U (a call whose heads do not runs as a ring over the whole
      group instead, announced once).
    * ``ring`` — R: groups that pass key/value blocks around a ring and merge partial outputs by their
      log-sum-exp (only backends that return it serve these steps).
    * ``mesh`` — None (the default process group, ``torch.distributed.group.WORLD``), a
      ``ProcessGroup``, a 1-D ``DeviceMesh``, or a 2-D ``DeviceMesh`` with dims named ``"ring"`` and
      ``"ulysses"``.

    U × R must equal the group's size; a missing one is the rest of the group, and with both missing
    the whole group is Ulysses. ``attnpatch.apply(..., parallel={"ulysses": 2})`` takes a dict too, and
    the CLI a string ``"ulysses=2,ring=2"``.
    """

    ulysses: Optional[int] = None
    ring: Optional[int] = None
    mesh: Any = None

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"attnpatch.ContextParallel: {name} must be a positive int or None, got {v!r}")

    @classmethod
    def coerce(cls, spec: Union["ContextParallel", Dict[str, Any], str]) -> "ContextParallel":
        """A `ContextParallel` from itself, a dict (keys ulysses, ring, mesh) or a string
        ``"ulysses=2,ring=2"``; anything else is a TypeError naming what is accepted."""
        if isinstance(spec, ContextParallel):
            return spec
        if isinstance(spec, str):
            out: Dict[str, Any] = {}
            for part in (p.strip() for p in spec.split(",") if p.strip()):
                key, sep, value = part.partition("=")
                key = key.strip()
                if not sep or key not in ("ulysses", "ring") or not value.strip().isdigit():
                    raise ValueError(f"attnpatch: parallel spec {spec!r}: expected entries like 'ulysses=2' or "
                                     "'ring=2' separated by commas")
                out[key] = int(value)
            spec = out
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"ulysses", "ring", "mesh"})
            if unknown:
                raise ValueError(f"attnpatch: parallel={spec!r}: unknown keys {unknown}; allowed: ulysses, ring, mesh")
            return cls(**spec)
        raise TypeError(f"attnpatch.apply(parallel=...): expected an attnpatch.ContextParallel, a dict such as "
                        f"{{'ulysses': 2}} or a string 'ulysses=2,ring=2', got {type(spec).__name__}")


# -- process groups ------------------------------------------------------------------------------------

@dataclass(eq=False)
class Groups:
    """The process groups of one context-parallel setup, and this process's place in them."""

    cp: Any                      # the whole context-parallel group (gathers, length exchange, fallback ring)
    ranks: Tuple[int, ...]       # global ranks of the cp group, in group-rank order
    index: int                   # this process's rank in ``cp``
    U: int
    R: int
    ulysses: Any                 # the group of the U processes with this ring index (None when U == 1)
    ring: Any                    # the group of the R processes with this ulysses index (None when R == 1)

    @property
    def size(self) -> int:
        return self.U * self.R

    @property
    def u(self) -> int:
        return self.index % self.U

    @property
    def g(self) -> int:
        return self.index // self.U

    @property
    def ring_ranks(self) -> Tuple[int, ...]:
        """Global ranks of this process's ring group, by ring index."""
        return tuple(self.ranks[j * self.U + self.u] for j in range(self.R))

    def describe(self) -> str:
        return f"ulysses={self.U}, ring={self.R} over {self.size} processes (this one: {self.index})"


_GROUPS: Dict[Tuple[Tuple[int, ...], int, int], Tuple[Any, Any]] = {}
_GROUPS_LOCK = threading.Lock()


def _require_distributed() -> None:
    if not dist.is_available():
        raise ContextParallelError("context parallelism needs torch.distributed, which this torch build does not have")
    if not dist.is_initialized():
        raise ContextParallelError(
            "context parallelism needs an initialised torch.distributed process group: start the processes with "
            "torchrun (e.g. `torchrun --nproc-per-node 2 script.py`) and call "
            "torch.distributed.init_process_group() before attnpatch.apply(..., parallel=...)")


def _degrees(cfg: ContextParallel, W: int, where: str) -> Tuple[int, int]:
    U, R = cfg.ulysses, cfg.ring
    if U is None and R is None:
        U, R = W, 1
    elif U is None:
        if W % R:
            raise ValueError(f"{where}: ring={R} does not divide the group size {W}")
        U = W // R
    elif R is None:
        if W % U:
            raise ValueError(f"{where}: ulysses={U} does not divide the group size {W}")
        R = W // U
    if U * R != W:
        raise ValueError(f"{where}: ulysses={U} × ring={R} = {U * R}, but the group has {W} processes; "
                         "U × R must equal the group size")
    return U, R


def _subgroup(ranks: Sequence[int]):
    # only the members create it (the context-parallel group may be part of a larger world)
    return dist.new_group(sorted(ranks), use_local_synchronization=True)


def resolve_groups(cfg: ContextParallel) -> Groups:
    """The process groups for ``cfg`` (created once per (group, U, R) and reused)."""
    _require_distributed()
    mesh = cfg.mesh
    where = "attnpatch.ContextParallel"
    ulysses_group = ring_group = None
    if mesh is None:
        cp = dist.group.WORLD
    elif isinstance(mesh, dist.ProcessGroup):
        cp = mesh
    elif type(mesh).__name__ == "DeviceMesh":
        if mesh.ndim == 1:
            cp = mesh.get_group()
        elif mesh.ndim == 2 and set(mesh.mesh_dim_names or ()) == {"ring", "ulysses"}:
            R_m, U_m = mesh["ring"].size(), mesh["ulysses"].size()
            if (cfg.ulysses not in (None, U_m)) or (cfg.ring not in (None, R_m)):
                raise ValueError(f"{where}: ulysses={cfg.ulysses}, ring={cfg.ring} disagree with the mesh "
                                 f"(ring {R_m} × ulysses {U_m})")
            flat = mesh.mesh.permute(*[mesh.mesh_dim_names.index(n) for n in ("ring", "ulysses")]).reshape(-1).tolist()
            if flat != sorted(flat):
                raise ValueError(f"{where}: the mesh's ranks {flat} are not in (ring, ulysses) row-major order; "
                                 "build it with init_device_mesh(device, (R, U), mesh_dim_names=('ring', 'ulysses'))")
            cp = _subgroup(flat) if len(flat) != dist.get_world_size() else dist.group.WORLD
            ulysses_group = mesh["ulysses"].get_group() if U_m > 1 else None
            ring_group = mesh["ring"].get_group() if R_m > 1 else None
            cfg = ContextParallel(ulysses=U_m, ring=R_m)
        else:
            raise ValueError(f"{where}: a DeviceMesh must be 1-D, or 2-D with dims named 'ring' and 'ulysses'; "
                             f"got {mesh.ndim}-D with names {mesh.mesh_dim_names}")
    else:
        raise TypeError(f"{where}: mesh must be None, a torch.distributed ProcessGroup or a DeviceMesh, "
                        f"got {type(mesh).__name__}")
    ranks = tuple(dist.get_process_group_ranks(cp))
    index = dist.get_rank(cp)
    if index < 0:
        raise ContextParallelError(f"{where}: this process (global rank {dist.get_rank()}) is not a member of the "
                                   f"context-parallel group {list(ranks)}")
    W = len(ranks)
    U, R = _degrees(cfg, W, where)
    if ulysses_group is None and ring_group is None:
        ulysses_group, ring_group = _cached_subgroups(cp, ranks, U, R, index)
    return Groups(cp=cp, ranks=ranks, index=index, U=U, R=R, ulysses=ulysses_group, ring=ring_group)


def _cached_subgroups(cp, ranks: Tuple[int, ...], U: int, R: int, index: int) -> Tuple[Any, Any]:
    """The Ulysses and ring groups of this process (None for a degree of 1; the context-parallel group
    itself when one degree is the whole group), created once per (ranks, U, R)."""
    W = len(ranks)
    if U == W or R == W:
        return (cp if U > 1 else None), (cp if R > 1 else None)
    key = (ranks, U, R)
    with _GROUPS_LOCK:
        hit = _GROUPS.get(key)
        if hit is None:
            g, u = divmod(index, U)
            hit = _GROUPS[key] = (_subgroup(ranks[g * U:(g + 1) * U]), _subgroup(ranks[u::U]))
        return hit


# -- sequence layout: which tokens each process holds ---------------------------------------------------

def _even_sizes(n: int, parts: int) -> List[int]:
    """``tensor_split`` sizes: the first ``n % parts`` parts get one more."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _starts(sizes: Sequence[int]) -> List[int]:
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out


@dataclass(frozen=True)
class SequenceLayout:
    """Which tokens of a length-L sequence each of the U × R processes holds.

    ``order`` is "contiguous" (process i holds the i-th of W nearly equal slices) or "zigzag" (the
    load-balanced order for causal attention in a ring: 2R chunks, ring group g holds chunks g and
    2R-1-g, split among its U processes). Runs are (start, length) in global positions, in the order
    the process holds them."""

    U: int
    R: int
    order: str = "contiguous"

    @property
    def W(self) -> int:
        return self.U * self.R

    def group_runs(self, L: int, g: int) -> Tuple[Tuple[int, int], ...]:
        """The runs of ring group g's tokens, in the order its Ulysses all-to-all assembles them."""
        return _group_runs(self, L, g)

    def runs(self, L: int, i: int) -> Tuple[Tuple[int, int], ...]:
        return _runs(self, L, i)

    def sizes(self, L: int) -> Tuple[int, ...]:
        return tuple(sum(n for _, n in self.runs(L, i)) for i in range(self.W))

    def is_even(self, L: int) -> bool:
        return len(set(self.sizes(L))) == 1

    def chunk_sizes(self, L: int) -> List[int]:
        """zigzag: the 2R chunk lengths."""
        return _even_sizes(L, 2 * self.R)

    def positions(self, L: int, runs: Sequence[Tuple[int, int]], device) -> torch.Tensor:
        return _positions(L, tuple(runs), str(device))

    def shard(self, x: torch.Tensor, dim: int, i: int) -> torch.Tensor:
        """Process i's part of ``x`` along ``dim`` (a view for a single run)."""
        runs = self.runs(x.shape[dim], i)
        if len(runs) == 1:
            return x.narrow(dim, runs[0][0], runs[0][1])
        return torch.cat([x.narrow(dim, s, n) for s, n in runs], dim=dim)

    def assemble(self, parts: Sequence[torch.Tensor], dim: int, L: int) -> torch.Tensor:
        """The whole sequence from every process's part (in process order)."""
        if self.order == "contiguous":
            return torch.cat(list(parts), dim=dim)
        pieces = []
        for i, part in enumerate(parts):
            off = 0
            for s, n in self.runs(L, i):
                pieces.append((s, part.narrow(dim, off, n)))
                off += n
        pieces.sort(key=lambda t: t[0])
        return torch.cat([p for _, p in pieces], dim=dim)


@lru_cache(maxsize=4096)
def _group_runs(layout: SequenceLayout, L: int, g: int) -> Tuple[Tuple[int, int], ...]:
    if layout.order == "zigzag":
        sizes = _even_sizes(L, 2 * layout.R)
        starts = _starts(sizes)
        a, b = g, 2 * layout.R - 1 - g
        return tuple((starts[c], sizes[c]) for c in (a, b) if sizes[c])
    sizes = _even_sizes(L, layout.W)
    starts = _starts(sizes)
    first, last = g * layout.U, (g + 1) * layout.U - 1
    return ((starts[first], starts[last] + sizes[last] - starts[first]),)


@lru_cache(maxsize=4096)
def _runs(layout: SequenceLayout, L: int, i: int) -> Tuple[Tuple[int, int], ...]:
    if layout.order == "contiguous":
        sizes = _even_sizes(L, layout.W)
        return ((_starts(sizes)[i], sizes[i]),)
    g, u = divmod(i, layout.U)
    group = _group_runs(layout, L, g)
    total = sum(n for _, n in group)
    sizes = _even_sizes(total, layout.U)
    lo = _starts(sizes)[u]
    hi = lo + sizes[u]
    out, off = [], 0
    for s, n in group:  # the part [lo, hi) of the group's concatenated runs
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            out.append((s + a - off, b - a))
        off += n
    return tuple(out) if out else ((0, 0),)


@lru_cache(maxsize=256)
def _positions(L: int, runs: Tuple[Tuple[int, int], ...], device: str) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n) for s, n in runs]).to(device)


# -- communication helpers ------------------------------------------------------------------------------

def _pad_dim(x: torch.Tensor, dim: int, to: int) -> torch.Tensor:
    n = x.shape[dim]
    if n == to:
        return x
    shape = list(x.shape)
    shape[dim] = to - n
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def all_gather_along(x: torch.Tensor, dim: int, group, sizes: Sequence[int]) -> List[torch.Tensor]:
    """Every member's ``x`` (member order), whose lengths along ``dim`` are ``sizes``."""
    m = max(sizes)
    xp = _pad_dim(x.contiguous(), dim, m)
    out = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(out, xp, group=group)
    return [t.narrow(dim, 0, n) if n != m else t for t, n in zip(out, sizes)]


def _seq_to_heads(x: torch.Tensor, lens: Sequence[int], group, U: int) -> torch.Tensor:
    """Ulysses forward all-to-all: (b, s_me, H, d) sequence shard of every head -> (b, S, H/U, d), the
    whole group sequence (members' shards in member order) of this member's heads."""
    b, s, H, d = x.shape
    h = H // U
    m = max(lens)
    xp = _pad_dim(x, 1, m)
    send = xp.reshape(b, m, U, h, d).permute(2, 0, 1, 3, 4).contiguous()  # (U, b, m, h, d): to member j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: member j's tokens, my heads
    if all(n == m for n in lens):
        return recv.permute(1, 0, 2, 3, 4).reshape(b, U * m, h, d)
    return torch.cat([recv[j, :, :n] for j, n in enumerate(lens)], dim=1)


def _heads_to_seq(y: torch.Tensor, lens: Sequence[int], me: int, group, U: int) -> torch.Tensor:
    """Ulysses reverse all-to-all: (b, S, h, d) of this member's heads -> (b, s_me, U*h, d)."""
    b, S, h, d = y.shape
    m = max(lens)
    if all(n == m for n in lens):
        send = y.reshape(b, U, m, h, d).permute(1, 0, 2, 3, 4).contiguous()
    else:
        parts = torch.split(y, list(lens), dim=1)
        send = torch.stack([_pad_dim(p, 1, m) for p in parts]).contiguous()
    recv = torch.empty_like(send)  # recv[j]: my tokens, member j's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv[:, :, :lens[me]].permute(1, 2, 0, 3, 4).reshape(b, lens[me], U * h, d)


def _lse_heads_to_seq(lse: torch.Tensor, lens: Sequence[int], me: int, group, U: int) -> torch.Tensor:
    """(b, h, S) float32 -> (b, U*h, s_me)."""
    b, h, S = lse.shape
    m = max(lens)
    parts = torch.split(lse, list(lens), dim=2)
    send = torch.stack([_pad_dim(p, 2, m) for p in parts]).contiguous()  # (U, b, h, m)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv[..., :lens[me]].permute(1, 0, 2, 3).reshape(b, U * h, lens[me])


def merge_partial(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge one partial attention result into the accumulators, in place (float32).

    ``acc_out``/``out``: (b, s, h, d) (``out`` any float dtype); ``acc_lse``/``lse``: (b, h, s), natural log,
    -inf for rows with no key. softmax over the union of two key sets = exp(lse_a - lse) * out_a +
    exp(lse_b - lse) * out_b with lse = logaddexp(lse_a, lse_b); rows empty in both stay 0 / -inf."""
    new = torch.logaddexp(acc_lse, lse)
    w_acc = torch.exp(acc_lse - new).nan_to_num_(0.0).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse - new).nan_to_num_(0.0).transpose(1, 2).unsqueeze(-1)
    acc_out.mul_(w_acc).addcmul_(out.float(), w_new)
    acc_lse.copy_(new)


# -- per-call masks --------------------------------------------------------------------------------------

@dataclass
class _Mask:
    """A call's mask, classified. ``kind`` "local": its key dim is this process's keys and it has one
    query row (key padding): it travels with the keys. "global": its key dim (and query dim, unless 1)
    spans the whole sequence: it is indexed by global positions."""

    kind: str
    value: torch.Tensor  # 4-D


def _view4(m: torch.Tensor) -> torch.Tensor:
    return m if m.dim() == 4 else m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))


def _slice_heads(m: torch.Tensor, H: int, lo: int, n: int) -> torch.Tensor:
    return m.narrow(1, lo, n) if m.shape[1] == H and n != H else m


# -- the per-model runtime ---------------------------------------------------------------------------------

class Region:
    """The context-parallel state of one model (one pipeline component): its groups and layout, whether
    it is inside its sharded region now, and the split lengths of the current forward.

    The split/gather hooks (``attnpatch.adapters.sequence_split``) call `split`, `gather` and
    `begin`/`end`; the router calls `plan_call` (through `attnpatch.router.SITE_PLANNERS`) for each new call
    signature of one of the model's sites."""

    def __init__(self, groups: Groups, plan, component: str = ""):
        self.groups = groups
        self.plan = plan
        self.component = component
        self.layout = SequenceLayout(groups.U, groups.R, "zigzag" if plan.causal and groups.R > 1 else "contiguous")
        self.cross_kv_split = plan.cross_kv == "split"
        self.active = False
        self.uneven = False
        self.records: Dict[str, int] = {}   # split name -> global length, this forward
        self.lengths: set = set()           # global lengths split this forward
        self.counts: Counter = Counter()
        self._inner: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._inner_ids: "weakref.WeakSet" = weakref.WeakSet()
        self._warned: set = set()

    # -- region state (hooks) -------------------------------------------------------------------------

    def begin(self) -> None:
        """The model's forward starts: not sharded yet, no lengths recorded."""
        self.active = False
        self.uneven = False
        self.records.clear()
        self.lengths.clear()

    def end(self, completed: bool) -> None:
        """The model's forward returns (``completed``) or raised. A region still open at a normal return
        means the plan split the sequence and nothing gathered it: the output would be one process's shard."""
        still_open = self.active
        self.active = False
        if completed and still_open:
            raise ContextParallelError(
                f"context parallel plan {self.plan.source}: the model returned while its sequence was still split "
                "(no gather ran after the last split), so its output would be this process's shard only; add a "
                "`gather:` entry at the module that produces the output (e.g. proj_out / norm)")

    def split(self, x: torch.Tensor, dim: int, name: str, parts: Sequence[str] = ()) -> torch.Tensor:
        """This process's part of ``x`` along ``dim``; enters the sharded region. With ``parts`` the
        tensor is the concatenation of those earlier splits' sequences, each split on its own."""
        dim = dim % x.dim()
        L = x.shape[dim]
        i = self.groups.index
        if parts:
            lens = []
            for p in parts:
                if p not in self.records:
                    raise ContextParallelError(
                        f"context parallel plan {self.plan.source}: split {name!r} is made of {list(parts)}, but "
                        f"{p!r} was not split before it in this forward; list {p!r} earlier in the plan")
                lens.append(self.records[p])
            if sum(lens) != L:
                raise ContextParallelError(
                    f"context parallel plan {self.plan.source}: split {name!r} has length {L} along dim {dim}, but "
                    f"its parts {list(parts)} have lengths {lens} (sum {sum(lens)})")
            out, off = [], 0
            for n in lens:
                out.append(self.layout.shard(x.narrow(dim, off, n), dim, i))
                off += n
            local = torch.cat(out, dim=dim)
        else:
            local = self.layout.shard(x, dim, i)
            self.records[name] = L
            self.lengths.add(L)
            if not self.layout.is_even(L):
                self._announce_uneven(name, L)
                self.uneven = True
        self.active = True
        return local

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence along ``dim`` from every process's part; leaves the sharded region."""
        dim = dim % x.dim()
        g = self.groups
        n = x.shape[dim]
        if self.uneven:
            sizes = self._exchange([n], x.device)
            sizes = [s[0] for s in sizes]
        else:
            sizes = [n] * g.size
        L = sum(sizes)
        if self.layout.order != "contiguous" and tuple(sizes) != self.layout.sizes(L):
            raise ContextParallelError(
                f"context parallel plan {self.plan.source}: a gathered tensor has per-process lengths {sizes}, which "
                "is not one sequence split by the plan; gather the model's output, not a concatenation of sequences")
        parts = all_gather_along(x, dim, g.cp, sizes) if g.size > 1 else [x]
        self.active = False
        return self.layout.assemble(parts, dim, L)

    def reset(self) -> None:
        self.active = False

    def _announce_uneven(self, name: str, L: int) -> None:
        key = ("uneven", name, L)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "attnpatch: context parallel: %s has %d tokens, which does not divide evenly over %d processes; "
                "the result is exact, but every attention call then exchanges the processes' lengths (one small "
                "all-gather, a host sync). Lengths that divide by %d avoid it.", name, L, self.groups.size,
                self.groups.size if self.layout.order == "contiguous" else 2 * self.groups.size)

    def _warn_once(self, key, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _exchange(self, values: List[int], device) -> List[List[int]]:
        """Every process's ``values`` (one small all-gather over the group)."""
        t = torch.tensor(values, dtype=torch.int64, device=device)
        out = [torch.empty_like(t) for _ in range(self.groups.size)]
        dist.all_gather(out, t, group=self.groups.cp)
        return [o.tolist() for o in out]

    # -- the router's planner ---------------------------------------------------------------------------

    def inner_scope(self, scope):
        """The scope of the local calls a parallel call makes: the site's settings, but not parallel."""
        inner = self._inner.get(scope)
        if inner is None:
            from .controls import Scope

            inner = Scope(backends=scope.backends, strict=scope.strict, allow_lossy=scope.allow_lossy,
                          source=scope.source, site=scope.site)
            self._inner[scope] = inner
            self._inner_ids.add(inner)
        return inner

    def inner_scopes(self) -> List[Any]:
        return list(self._inner_ids)

    def plan_call(self, scope, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend,
                  features, sinks):
        """`attnpatch.router.SITE_PLANNERS` entry: the router's plan for one call signature of a site of
        this model (None for the local calls this module makes itself)."""
        if scope in self._inner_ids:
            return None
        from . import router

        inner = self.inner_scope(scope)
        site = scope.site
        call = _CallPlan(self, inner, site, layout, backend, features, grad)
        plan = router.DelegatingPlan(router.Decision(router.registry.get_backend("sdpa"), "context parallel"),
                                     call.run, site)
        return plan


class _CallPlan:
    """The decisions fixed for one call signature of one site; `run` is what the router calls."""

    __slots__ = ("region", "inner", "site", "layout", "backend", "features", "grad", "route", "replicated", "where")

    def __init__(self, region: Region, inner, site, layout, backend, features, grad):
        from . import router

        self.region = region
        self.inner = inner
        self.site = site
        self.layout = layout
        self.backend = backend
        self.features = features
        self.grad = grad
        self.route = router.route
        kind = getattr(site, "kind", "unknown")
        self.replicated = kind == "cross" and not region.cross_kv_split
        self.where = f"{getattr(site, 'path', '') or '<root>'} ({kind} attention)"

    def run(self, q, k, v, m, c, s, p, sinks=None):
        region = self.region
        if not region.active:
            region.counts["outside the sharded region (local)"] += 1
            return self.route(self.inner, q, k, v, self.layout, m, c, s, p, self.backend, self.features, sinks)
        if p:
            raise ContextParallelError(
                f"{self.where}: dropout_p={p} inside the context-parallel region is refused: each process would draw "
                "its own dropout masks, so the result would not be one model's; pass dropout_p=0 (model.eval())")
        if self.grad:
            raise ContextParallelError(
                f"{self.where}: context-parallel attention runs inference only; this call needs gradients. Run the "
                "model under torch.no_grad() or torch.inference_mode()")
        if self.replicated:
            return _replicated_kv(self, q, k, v, m, c, s, sinks)
        return _sharded(self, q, k, v, m, c, s, sinks)


# -- the attention algorithms ------------------------------------------------------------------------------

def _replicated_kv(cp: _CallPlan, q, k, v, m, c, s, sinks):
    """Cross-attention whose keys/values (the text) are whole on every process: each process attends
    its own queries to all keys, locally, with no communication."""
    region = cp.region
    f = cp.features
    if c:
        raise ContextParallelError(
            f"{cp.where}: causal attention with keys/values that are not split (cross-attention) is refused inside "
            "the context-parallel region: the causal diagonal depends on the queries' global positions")
    if f is not None and f.window is not None:
        raise ContextParallelError(
            f"{cp.where}: a sliding window with keys/values that are not split is refused inside the context-parallel "
            "region (it depends on the queries' global positions)")
    if m is not None:
        m = _view4(m)
        sq = q.shape[1] if cp.layout == "bsnd" else q.shape[2]
        if m.shape[-2] not in (1, sq):
            m = m.index_select(2, _global_rows(cp, m.shape[-2], sq, q.device))
    region.counts["cross-attention, K/V not split (local)"] += 1
    return cp.route(cp.inner, q, k, v, cp.layout, m, c, s, 0.0, cp.backend, cp.features, sinks)


def _global_rows(cp: _CallPlan, rows: int, sq: int, device):
    """The global positions of this process's queries, for a mask with ``rows`` query rows that spans
    the whole sequence (a single split sequence only)."""
    region = cp.region
    g = region.groups
    lens = _lengths(region, sq, sq, device)[0]
    L = sum(lens)
    if rows != L or L not in region.lengths:
        raise ContextParallelError(
            f"{cp.where}: its mask has {rows} query rows, but this process holds {sq} queries of a sequence of {L}; "
            "a mask inside the context-parallel region must have 1 query row, this process's rows, or the rows of "
            "one whole split sequence")
    return region.layout.positions(L, region.layout.runs(L, g.index), device)


def _lengths(region: Region, sq: int, skv: int, device) -> Tuple[List[int], List[int]]:
    """Every process's (query, key) lengths for this call (no communication when the splits are even)."""
    W = region.groups.size
    if not region.uneven:
        return [sq] * W, [skv] * W
    got = region._exchange([sq, skv], device)
    return [a for a, _ in got], [b for _, b in got]


def _classify_mask(cp: _CallPlan, m, skv_local: int, kv_lens: Sequence[int], sq_total: int) -> Optional[_Mask]:
    if m is None:
        return None
    m = _view4(m)
    L = sum(kv_lens)
    rows, cols = m.shape[-2], m.shape[-1]
    region = cp.region
    if cols == skv_local and cols != L:
        if rows != 1:
            raise ContextParallelError(
                f"{cp.where}: its mask is {tuple(m.shape)}: this process's {rows} queries × this process's {cols} keys. "
                "Inside the context-parallel region that cannot say how queries attend the other processes' keys; "
                "give a key-padding mask (one query row) that the plan splits with the keys, or a mask over the whole "
                "sequence")
        return _Mask("local", m)
    if cols == L:
        if L not in region.lengths:
            raise ContextParallelError(
                f"{cp.where}: its mask spans {L} keys, which is not one split sequence of this forward (the keys are a "
                "concatenation of several); split the mask in the plan (a `parts:` split) so it arrives as a "
                "key-padding mask of this process's keys")
        if rows not in (1, sq_total):
            raise ContextParallelError(
                f"{cp.where}: its mask is {tuple(m.shape)}; over the whole sequence of {L} keys it needs 1 or {sq_total} "
                "query rows")
        return _Mask("global", m)
    raise ContextParallelError(
        f"{cp.where}: its mask has {cols} keys, but this process holds {skv_local} keys of {L}; a mask inside the "
        "context-parallel region must span this process's keys (key padding) or the whole sequence")


def _bsnd(x, layout):
    return x if layout == "bsnd" else x.transpose(1, 2)


def _sharded(cp: _CallPlan, q, k, v, m, c, s, sinks):
    """Self- or joint attention (or cross-attention with split keys) over the sharded sequence."""
    region = cp.region
    g = region.groups
    f = cp.features
    q, k, v = _bsnd(q, cp.layout), _bsnd(k, cp.layout), _bsnd(v, cp.layout)
    sq, H, skv = q.shape[1], q.shape[2], k.shape[1]
    q_lens, kv_lens = _lengths(region, sq, skv, q.device)
    if c and q_lens != kv_lens:
        raise ContextParallelError(f"{cp.where}: causal attention between sequences of different lengths "
                                   f"({sum(q_lens)} queries, {sum(kv_lens)} keys) inside the context-parallel region")
    mask = _classify_mask(cp, m, skv, kv_lens, sum(q_lens))
    window = f.window if f is not None else None
    softcap = f.softcap if f is not None else None
    want_lse = bool(f is not None and f.return_lse)
    U, R = g.U, g.R
    if U > 1 and H % U:
        if c and region.layout.order != "contiguous":
            raise ContextParallelError(
                f"{cp.where}: {H} heads do not divide ulysses={U}, and the ring fallback cannot serve causal attention "
                f"in the load-balanced order of ring={R}; use a ulysses degree that divides {H}")
        region._warn_once(("heads", cp.where, H),
                          "attnpatch: context parallel: %s has %d heads, which do not divide ulysses=%d; its calls "
                          "run as a ring over all %d processes instead (exact; the report counts them)",
                          cp.where, H, U, g.size)
        region.counts["ring over the whole group (heads do not divide ulysses)"] += 1
        if window is not None:
            raise _window_in_ring(cp)
        runs_q = runs_kv = None
        if mask is not None and mask.kind == "global":
            runs_q = [region.layout.runs(sum(q_lens), j) for j in range(g.size)]
            runs_kv = [region.layout.runs(sum(kv_lens), j) for j in range(g.size)]
        out, lse = _ring(cp, q, k, v, mask, c, s, softcap, sinks, want_lse, q_lens, kv_lens, g.index, g.size,
                         g.cp, g.ranks, "contiguous", runs_q, runs_kv)
        return _finish(cp, out, lse, want_lse)
    if U > 1:
        out, lse = _ulysses(cp, q, k, v, mask, c, s, window, softcap, sinks, want_lse, q_lens, kv_lens)
    else:
        if window is not None:
            raise _window_in_ring(cp)
        region.counts["ring"] += 1
        runs_kv = runs_q = None
        if mask is not None and mask.kind == "global":
            runs_q = [region.layout.runs(sum(q_lens), j) for j in range(g.size)]
            runs_kv = [region.layout.runs(sum(kv_lens), j) for j in range(g.size)]
        out, lse = _ring(cp, q, k, v, mask, c, s, softcap, sinks, want_lse, q_lens, kv_lens, g.index, R, g.ring,
                         g.ring_ranks, region.layout.order, runs_q, runs_kv)
    return _finish(cp, out, lse, want_lse)


def _window_in_ring(cp: _CallPlan) -> ContextParallelError:
    return ContextParallelError(
        f"{cp.where}: a sliding window inside a ring is refused (it depends on each block's global positions); use "
        "ulysses only (ring=1), whose all-to-all gives every process the whole sequence in order")


def _finish(cp: _CallPlan, out, lse, want_lse):
    if cp.layout == "bnsd":
        out = out.transpose(1, 2)
    return (out, lse) if want_lse else out


def _ulysses(cp: _CallPlan, q, k, v, mask: Optional[_Mask], causal, scale, window, softcap, sinks, want_lse,
             q_lens, kv_lens):
    region = cp.region
    g = region.groups
    U, R = g.U, g.R
    H, Hk = q.shape[2], k.shape[2]
    h = H // U
    grp = slice(g.g * U, (g.g + 1) * U)
    lq, lkv = q_lens[grp], kv_lens[grp]
    if R > 1 and window is not None:  # before any collective: every process refuses at the same point
        raise _window_in_ring(cp)
    if Hk % U:  # GQA with fewer key/value heads than processes: repeat them so that every process gets its share
        rep = _kv_repeat(H, Hk, U)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    qg = _seq_to_heads(q, lq, g.ulysses, U)
    kg = _seq_to_heads(k, lkv, g.ulysses, U)
    vg = _seq_to_heads(v, lkv, g.ulysses, U)
    sinks_g = sinks.narrow(0, g.u * h, h) if sinks is not None else None
    Lq, Lkv = sum(q_lens), sum(kv_lens)
    if R == 1:
        region.counts["ulysses"] += 1
        mg = _ulysses_mask(cp, mask, H, h, lkv, Lq, Lkv, q.device)
        res = cp.route(cp.inner, qg, kg, vg, "bsnd", mg, causal, scale, 0.0, cp.backend, cp.features, sinks_g)
        out, lse = res if want_lse else (res, None)
    else:
        region.counts["ulysses + ring"] += 1
        mg = None
        runs_q = runs_kv = None
        if mask is not None and mask.kind == "local":
            mg = _Mask("local", _gather_local_mask(_slice_heads(mask.value, H, g.u * h, h), lkv, g.ulysses))
        elif mask is not None:
            mg = _Mask("global", _slice_heads(mask.value, H, g.u * h, h))
            runs_q = [region.layout.group_runs(Lq, j) for j in range(R)]
            runs_kv = [region.layout.group_runs(Lkv, j) for j in range(R)]
        gq = [sum(q_lens[j * U:(j + 1) * U]) for j in range(R)]
        gkv = [sum(kv_lens[j * U:(j + 1) * U]) for j in range(R)]
        out, lse = _ring(cp, qg, kg, vg, mg, causal, scale, softcap, sinks_g, want_lse, gq, gkv, g.g, R, g.ring,
                         g.ring_ranks, region.layout.order, runs_q, runs_kv)
    out = _heads_to_seq(out, lq, g.u, g.ulysses, U)
    if want_lse:
        lse = _lse_heads_to_seq(lse.float(), lq, g.u, g.ulysses, U)
    return out, lse


def _kv_repeat(H: int, Hk: int, U: int) -> int:
    """The smallest factor to repeat Hk key/value heads by so that U processes get whole shares and every
    query head still finds its key/value head (GQA groups stay aligned)."""
    group = H // Hk
    for rep in range(1, group + 1):
        if group % rep == 0 and (Hk * rep) % U == 0:
            return rep
    return group


def _gather_local_mask(m: torch.Tensor, lens: Sequence[int], group) -> torch.Tensor:
    """A key-padding mask of this process's keys -> of the group's keys (member order)."""
    if len(lens) == 1:
        return m
    return torch.cat(all_gather_along(m, 3, group, lens), dim=3)


def _ulysses_mask(cp: _CallPlan, mask: Optional[_Mask], H: int, h: int, lkv, Lq: int, Lkv: int, device):
    if mask is None:
        return None
    g = cp.region.groups
    m = _slice_heads(mask.value, H, g.u * h, h)
    if mask.kind == "local":
        return _gather_local_mask(m, lkv, g.ulysses)
    layout = cp.region.layout
    if layout.order == "contiguous" and g.R == 1:
        return m  # the all-to-all assembles the whole sequence in order
    rows = layout.positions(Lq, layout.group_runs(Lq, g.g), device)
    cols = layout.positions(Lkv, layout.group_runs(Lkv, g.g), device)
    if m.shape[2] != 1:
        m = m.index_select(2, rows)
    return m.index_select(3, cols)


def _blocks(mode: str, causal: bool, me: int, j: int, a_me: int, a_j: int):
    """The (query slice, key slice, causal) sub-blocks of ring step j (see the module docstring)."""
    every = slice(None)
    if not causal:
        return [(every, every, False)]
    if j == me:
        return [(every, every, True)]
    if mode == "contiguous":
        return [(every, every, False)] if j < me else []
    if j < me:
        return [(every, slice(0, a_j), False)]  # the first chunk of j precedes all of mine
    return [(slice(a_me, None), every, False)]  # my second chunk follows all of j's


def _ring(cp: _CallPlan, q, k, v, mask: Optional[_Mask], causal, scale, softcap, sinks, want_lse, q_lens, kv_lens,
          me: int, R: int, group, peers: Sequence[int], mode: str, runs_q, runs_kv):
    """Ring attention over R members (this one: ``me``): key/value blocks move to the next member each
    step while the current one is attended; partial results are merged by their log-sum-exp.

    q: (b, sq, h, d) this member's queries; k/v: (b, skv, hk, d); ``*_lens``: every member's lengths;
    ``mode`` "contiguous" or "zigzag" (for causal); ``runs_*``: per member, its global runs (for a
    global mask)."""
    from . import router

    region = cp.region
    b, sq, h, d = q.shape
    features = router.make_features(softcap=softcap, return_lse=True)
    m_kv = max(kv_lens)
    if k.shape[-1] == v.shape[-1]:
        cur = torch.stack([_pad_dim(k, 1, m_kv), _pad_dim(v, 1, m_kv)])
    else:
        cur = (_pad_dim(k, 1, m_kv).contiguous(), _pad_dim(v, 1, m_kv).contiguous())
    nxt = torch.empty_like(cur) if isinstance(cur, torch.Tensor) else tuple(torch.empty_like(t) for t in cur)
    local_masks = None
    rows_idx = None
    if mask is not None and mask.kind == "local":
        local_masks = all_gather_along(mask.value, 3, group, kv_lens) if R > 1 else [mask.value]
    elif mask is not None:
        rows_idx = None if mask.value.shape[2] == 1 else region.layout.positions(sum(q_lens), runs_q[me], q.device)
    chunks = region.layout.chunk_sizes(sum(kv_lens)) if causal and mode == "zigzag" else None
    nxt_rank, prv_rank = peers[(me + 1) % R], peers[(me - 1) % R]
    acc_out = acc_lse = None
    for step in range(R):
        j = (me - step) % R
        reqs = []
        if step + 1 < R:
            ops = []
            for t_send, t_recv in (zip((cur,), (nxt,)) if isinstance(cur, torch.Tensor) else zip(cur, nxt)):
                ops.append(dist.P2POp(dist.isend, t_send, nxt_rank, group))
                ops.append(dist.P2POp(dist.irecv, t_recv, prv_rank, group))
            reqs = dist.batch_isend_irecv(ops)
        if isinstance(cur, torch.Tensor):
            kj, vj = cur[0, :, :kv_lens[j]], cur[1, :, :kv_lens[j]]
        else:
            kj, vj = cur[0][:, :kv_lens[j]], cur[1][:, :kv_lens[j]]
        mj = None
        if local_masks is not None:
            mj = local_masks[j]
        elif mask is not None:
            cols = region.layout.positions(sum(kv_lens), runs_kv[j], q.device)
            mj = mask.value if rows_idx is None else mask.value.index_select(2, rows_idx)
            mj = mj.index_select(3, cols)
        a_me = chunks[me] if chunks is not None else 0
        a_j = chunks[j] if chunks is not None else 0
        try:
            for rows, cols, diag in _blocks(mode, causal, me, j, a_me, a_j):
                qb = q[:, rows]
                kb, vb = kj[:, cols], vj[:, cols]
                mb = None
                if mj is not None:
                    mb = mj[:, :, rows] if mj.shape[2] != 1 else mj
                    mb = mb[..., cols]
                if qb.shape[1] == 0 or kb.shape[1] == 0:
                    continue
                out, lse = cp.route(cp.inner, qb, kb, vb, "bsnd", mb, diag, scale, 0.0, cp.backend, features, None)
                if acc_out is None:  # the first step is the own block: every query row
                    acc_out = out.float().contiguous()
                    acc_lse = lse.float().contiguous()
                else:
                    merge_partial(acc_out[:, rows], acc_lse[:, :, rows], out, lse)
        finally:  # the block in flight completes even when this step raised (no dangling transfer)
            for r in reqs:
                r.wait()
        if step + 1 < R:
            cur, nxt = nxt, cur
    if acc_out is None:  # no keys at all (empty sequence)
        acc_out = q.new_zeros(b, sq, h, v.shape[-1], dtype=torch.float32)
        acc_lse = torch.full((b, h, sq), float("-inf"), device=q.device)
    if sinks is not None:
        w = torch.sigmoid(acc_lse - sinks.float().view(1, -1, 1))
        acc_out.mul_(w.transpose(1, 2).unsqueeze(-1))
    return acc_out.to(q.dtype), (acc_lse if want_lse else None)


# -- on raw tensors -------------------------------------------------------------------------------------------------

class ContextParallelAttention:
    """Context-parallel attention for code that splits the sequence itself (and `attnpatch bench --parallel`).

    ``cpa = ContextParallelAttention({"ulysses": 2}, causal=False)``; ``cpa.shard(x, dim)`` is this process's
    part of a whole tensor (in the order the algorithms expect: load-balanced for ``causal`` with a ring),
    ``cpa(q, k, v, layout=...)`` attends this process's queries to the whole sequence and returns this
    process's part of the output, ``cpa.gather(out, dim)`` reassembles it. Masks follow the rules of the
    patched path: a key-padding mask of this process's keys (one query row), or a mask over the whole
    sequence of a tensor split with `shard`."""

    def __init__(self, parallel, causal: bool = False):

        self.config = ContextParallel.coerce(parallel)
        self.groups = resolve_groups(self.config)
        self.region = Region(self.groups, SequencePlan((), (), causal=causal, source="ContextParallelAttention"))
        self.region.active = True
        self._calls: Dict[tuple, _CallPlan] = {}

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        out = self.region.split(x, dim, f"tensor of {x.shape[dim % x.dim()]}")
        return out

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        out = self.region.gather(x, dim)
        self.region.active = True
        return out

    def __call__(self, query, key, value, *, layout: str = "bnsd", attn_mask=None, is_causal: bool = False,
                 scale=None, backend=None, kv_whole: bool = False):
        """This process's part of the attention output (same layout). ``kv_whole``: key/value are whole on
        every process (cross-attention), so each process attends locally."""
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        key_ = (layout, backend if backend is None or isinstance(backend, str) else tuple(backend), kv_whole, grad)
        call = self._calls.get(key_)
        if call is None:
            from .patch import Site

            site = Site(path="ContextParallelAttention", adapter="parallel", kind="cross" if kv_whole else "self")
            call = self._calls[key_] = _CallPlan(self.region, None, site, layout, backend, None, grad)
        return call.run(query, key, value, attn_mask, is_causal, scale, 0.0)


# -- attaching to a patched model ------------------------------------------------------------------------------

@dataclass(eq=False)
class ParallelState:
    """What `attach` did to a patch (``patch.parallel``): the configuration, the groups and one `Region`
    per parallel component."""

    config: ContextParallel
    groups: Groups
    regions: Dict[str, Region] = field(default_factory=dict)

    def same_as(self, spec) -> bool:
        if spec is None:
            return False
        try:
            other = ContextParallel.coerce(spec)
        except (TypeError, ValueError):
            return False
        return other == self.config

    def describe(self) -> List[str]:
        lines = []
        for comp, region in self.regions.items():
            counts = ", ".join(f"{k} ×{n}" for k, n in sorted(region.counts.items())) or "no calls yet"
            name = f"{comp}: " if comp else ""
            lines.append(f"context parallel: {name}{self.groups.describe()}, sequence order {region.layout.order}, "
                         f"plan {region.plan.source}; attention calls: {counts}")
        return lines


# -- which plan for which component (the recipe or `_cp_plan` of each component) -------------------------------------------------------------------------------

def plans_for(target, recipe=None) -> List[Tuple[str, torch.nn.Module, SequencePlan]]:
    """The (component name, module, plan) triples to make parallel in ``target``; refuses a target with
    no plan for its model (or, in a pipeline, for its denoiser)."""
    from . import recipes
    from .patch import _components

    explicit = recipes.load(recipe) if recipe is not None and recipe is not False else None
    comps = _components(target)
    pipeline = not (len(comps) == 1 and comps[0][0] == "")
    out = []
    missing = []
    for name, module in comps:
        wanted = _wanted(name, explicit, pipeline)
        if not wanted:
            continue
        plan = plan_for_module(module, explicit)
        if plan is None:
            missing.append((name, module))
        else:
            out.append((name, module, plan))
    if missing:
        name, module = missing[0]
        what = f"component {name!r} ({type(module).__name__})" if name else type(module).__name__
        raise ContextParallelError(
            f"context parallelism has no plan for {what}: it has no diffusers `_cp_plan`, and no recipe with a "
            f"`parallel:` section matches it (shipped recipes with one: {', '.join(shipped_with_plans()) or 'none'}). "
            "Pass recipe= a recipe whose `parallel:` section says where the sequence is split and gathered "
            "(README: Context parallelism)")
    if not out:
        raise ContextParallelError(
            f"context parallelism found no denoiser component in {type(target).__name__} "
            f"(looked for {', '.join(DENOISERS)}); name the components in the recipe's parallel.components")
    return out


def _wanted(component: str, explicit, pipeline: bool) -> bool:
    import fnmatch

    if not pipeline:
        return True
    names = DENOISERS
    if explicit is not None and explicit.parallel is not None and explicit.parallel.components:
        names = explicit.parallel.components
    return any(fnmatch.fnmatchcase(component, n) for n in names)


def plan_for_module(module: torch.nn.Module, explicit=None) -> Optional[SequencePlan]:
    """The plan for one model: the explicit recipe's section, its ``_cp_plan``, or a shipped recipe's."""
    from . import recipes

    if explicit is not None and explicit.parallel is not None:
        return explicit.parallel
    cp_plan = getattr(module, "_cp_plan", None)
    if isinstance(cp_plan, dict) and cp_plan:
        return from_cp_plan(cp_plan, f"diffusers {type(module).__name__}._cp_plan")
    for rec in recipes.all_shipped():
        if rec.parallel is not None and recipes.recipe_matches(rec, module):
            return rec.parallel
    return None


def shipped_with_plans() -> List[str]:
    from . import recipes

    return [r.name for r in recipes.all_shipped() if r.parallel is not None]



def attach(patch, target, parallel, recipe=None) -> ParallelState:
    """Make ``patch`` (just applied to ``target``) context parallel; every change goes through the patch's
    undo log. Called by `attnpatch.apply(..., parallel=...)`; raises `ContextParallelError` /
    ``ValueError`` naming what is missing (the caller then removes the patch)."""
    from . import parallel_plan, router
    from .adapters import sequence_split

    cfg = ContextParallel.coerce(parallel)
    targets = plans_for(target, recipe)  # before any collective: a refusal is the same everywhere
    groups = resolve_groups(cfg)
    state = ParallelState(cfg, groups)
    undo = patch._undo_extra
    for comp, root, plan in targets:
        if getattr(root, "_parallel_config", None) is not None:
            raise ContextParallelError(
                f"{type(root).__name__}{f' ({comp})' if comp else ''} has diffusers' own context parallelism enabled "
                "(enable_parallelism); diffusers cannot undo it: use a fresh model with attnpatch's parallel=, or "
                "diffusers' alone")
        sites = [s for s in patch.sites if s.component == comp]
        unrouted = [s for s in sites if not s.routed]
        if unrouted:
            listed = "; ".join(f"{s.path} ({s.note})" for s in unrouted[:4])
            raise ContextParallelError(
                f"context parallelism needs every attention of {type(root).__name__} routed through attnpatch (it "
                f"would otherwise attend one process's shard only), but {len(unrouted)} sites are not: {listed}")
        resolved = parallel_plan.resolve(plan, root)
        region = Region(groups, plan, comp)
        sequence_split.install(resolved, region, undo)
        for site in sites:
            _register_site(site, region, undo)
        state.regions[comp] = region
        undo.call(lambda r=region: router.forget_scopes(r.inner_scopes()), "forget the context-parallel local scopes")
    undo.set_attr(patch, "parallel", state)
    logger.info("attnpatch: context parallel on %s: %s", type(target).__name__, groups.describe())
    return state


def _register_site(site, region: Region, undo) -> None:
    from . import router

    router.SITE_PLANNERS[site] = region.plan_call
    undo.call(lambda s=site: router.SITE_PLANNERS.pop(s, None), f"context parallel planner of {site.path}")
    original = site.record_bypass
    where = site.path or "<root>"

    def record_bypass(reason: str) -> None:
        if region.active:
            raise ContextParallelError(
                f"{where}: a call attnpatch cannot route ({reason}) arrived inside the context-parallel region; the "
                "library's own attention would see this process's shard only. Remove what makes it unroutable, or "
                "run without parallel=")
        original(reason)

    undo.set_attr(site, "record_bypass", record_bypass)
