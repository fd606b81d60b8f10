"""Measured auto: time the eligible backends once per call signature and keep the fastest.

The router asks `choose` on a decision miss when auto has more than one eligible backend. The first
time a signature (`Call.signature()`: device, dtype, head dims, mask kind, causal, gradient, length
buckets, ...) is seen outside torch.compile tracing and CUDA-graph capture, each candidate is run a
few times on fresh random tensors of the call's shape (CUDA events, warm-up, median) and the fastest
is kept. A candidate that raises while timed is dropped, with the reason logged. Under compilation
or capture only an existing measurement is used; otherwise the static table decides.

Choices are kept in memory and in a plain JSON file (`cache_path()`): ``$ATTNPATCH_CACHE_DIR``, else
``$XDG_CACHE_HOME/attnpatch``, else ``~/.cache/attnpatch``. The file holds one section per machine
(GPU name, compute capability, driver, torch, CUDA and cuDNN versions); each entry records every
candidate's time and version. An entry is only ever a ranking: the router passes the backends that
are eligible for the call (reasons recomputed in this process), and `choose` picks among those, so a
stale, corrupt or hostile file can at worst reorder eligible backends. Entries whose backend versions
differ from the installed ones, or that did not time every eligible candidate, are measured again.
A corrupt file is ignored with a warning. Writes hold a lock file, merge with what is on disk, and
replace the file atomically, so two processes writing at once keep both entries.

Before timing, a decision shipped for a measured card (`attnpatch.shipped_tables`: sm90, where torch's
own dispatch is within a few percent of the fastest exact kernel) answers the calls it covers, so a
fresh process on an H100/H200 times nothing for them; an entry of this machine's cache still wins,
except over a rule marked ``over_measurement`` (decoding steps: timing one key length cannot see that
cuDNN builds a graph for every new one).

``ATTNPATCH_AUTOTUNE=0`` turns measuring off (the static ``AUTO_PRIORITY`` table decides). Timing
runs only on CUDA; other devices keep the static table. Tests inject a timer with `override_timer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import platform
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import diskfile, shipped_tables
from .call import Call

logger = logging.getLogger("attnpatch")

#: Format tag and version of the JSON cache file; any other value makes the file ignored.
FILE_FORMAT = "attnpatch-autotune"
FILE_VERSION = 1
FILE_NAME = "autotune.json"

#: Devices whose calls are timed by default (CPU timing is not worth it: the static table decides).
TIMED_DEVICES: Tuple[str, ...] = ("cuda",)

#: At most this many eligible candidates are timed, taken in static-table order. The static order puts
#: the fallback-only kernels (math, eager) last, so they are timed only when little else is eligible.
#: A backend may also declare ``AUTOTUNE_TIMED = False`` (e.g. one that must compile before it runs).
MAX_TIMED = 4

#: Timing budget per candidate (ms of kernel time) and the bounds on timed samples.
BUDGET_MS = 4.0
MIN_SAMPLES = 3
MAX_SAMPLES = 15
#: A sample groups enough calls to last at least this long (small kernels), at most MAX_INNER calls.
MIN_SAMPLE_MS = 0.2
MAX_INNER = 32

#: Calls shorter than this (ms, first estimate) are timed with the GPU given a lead of that estimate
#: first (`_stream_ms`), as they run in a model (the GPU busy, the host launching ahead): timed from an
#: idle GPU, a sample also held the host's launch cost, which favoured kernels with a light Python
#: wrapper. On an H200 (2026-11-30), FlashAttention 3 at Flux's shape timed 0.631 ms that way against
#: cuDNN's 0.553, where back to back it runs 0.393 against 0.432 (its Python wrapper costs ~80 µs per call).
LEAD_BELOW_MS = 2.0

#: How `measure` times, stored in each entry: an entry timed another way is measured again rather than
#: trusted. 1 (no "method"): each sample from an idle GPU; 2: each sample behind one queued call and
#: synchronised, which a host hiccup longer than that call still reached (H200, 2026-11-30: 3 of 20
#: timings of FlashAttention 3 at HunyuanVideo's key-padding shape, 0.21-0.38 ms of host per call against
#: 0.42 ms of kernel, read 0.55-0.62 ms against 0.41-0.42, once taking cuDNN's 0.61 over it); 3: all
#: samples in one stream behind a GPU-side lead (`_stream_ms`), which absorbs short stalls (GPU test:
#: `test_autotune_timing_absorbs_a_burst_of_host_stalls`) but by design still reads a host as slow as the
#: kernel; that FA3 path was so (its interface's own cost) until `flash_attn3.DirectForward`: 0.10-0.12 ms
#: of host, 20 of 20 timings 0.414-0.427 ms (H200, ninth run, docs/GPU_BACKENDS.md).
TIMING_METHOD = 3

#: Candidates within this fraction of the fastest count as tied; the static order breaks ties, so
#: timing noise does not flip a choice between equal kernels.
TIE_MARGIN = 0.01

#: Sections (machines) and entries per section kept in the file; the oldest go first.
MAX_MACHINES = 8
MAX_ENTRIES = 4096

#: A timer: (backend, call) -> median milliseconds per call. Raising drops the candidate.
Timer = Callable[[object, Call], float]

_LOCK = threading.RLock()
_TIMER: Optional[Timer] = None
_TIMER_DEVICES: Optional[Tuple[str, ...]] = None
_STORES: Dict[str, "_Store"] = {}
_MACHINES: Dict[tuple, Tuple[str, dict]] = {}
_WARNED: set = set()


# -- where the cache lives ---------------------------------------------------------------------------

def cache_dir() -> pathlib.Path:
    """``$ATTNPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnpatch``, else ``~/.cache/attnpatch``."""
    override = os.environ.get("ATTNPATCH_CACHE_DIR", "").strip()
    if override:
        return pathlib.Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "attnpatch"


def cache_path() -> pathlib.Path:
    """The JSON file that holds the measured choices (it may not exist yet)."""
    return cache_dir() / FILE_NAME


# -- keys ----------------------------------------------------------------------------------------

def _plain(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, bool):
        return int(x)
    return x


def signature_key(call: Call) -> str:
    """The cache key of a call: its `Call.signature()` without the device index (the machine
    section names the GPU), as a string that is stable across processes."""
    sig = dataclasses.replace(call, device_index=None).signature()
    return json.dumps([_plain(x) for x in sig], separators=(",", ":"))


def _driver_version() -> str:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            first = fh.readline()
        for part in first.split():
            if part[:1].isdigit() and "." in part:
                return part
    except OSError:
        pass
    return "unknown"


def machine_info(call: Call) -> dict:
    """What a measurement depends on besides the call and the backends' versions."""
    info = {"device": call.device_type, "torch": torch.__version__}
    if call.device_type == "cuda":
        index = call.device_index if call.device_index is not None else torch.cuda.current_device()
        info.update(
            gpu=torch.cuda.get_device_name(index),
            capability=".".join(str(x) for x in (call.capability or torch.cuda.get_device_capability(index))),
            driver=_driver_version(), cuda=str(torch.version.cuda),
            cudnn=str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        )
    else:
        info.update(cpu=platform.machine() or "unknown", system=platform.system())
    return info


def machine_key(info: dict) -> str:
    """The section name for a machine: its `machine_info` as one readable, sorted string."""
    return "; ".join(f"{k}={info[k]}" for k in sorted(info))


def _machine(call: Call) -> Tuple[str, dict]:
    k = (call.device_type, call.device_index)
    got = _MACHINES.get(k)
    if got is None:
        info = machine_info(call)
        got = (machine_key(info), info)
        _MACHINES[k] = got
    return got


def _versions(backends: Sequence) -> Dict[str, str]:
    return {b.NAME: str(b.version()) for b in backends}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _warn_once(key, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


# -- the file ----------------------------------------------------------------------------------------

def _valid_entry(e) -> bool:
    """An entry is a dict with ``times_ms`` {name: positive finite ms}, ``failed`` {name: str},
    ``versions`` {name: str} and ``measured`` (str). Anything else is dropped."""
    if not isinstance(e, dict):
        return False
    times, failed, versions = e.get("times_ms"), e.get("failed", {}), e.get("versions")
    if not isinstance(times, dict) or not isinstance(failed, dict) or not isinstance(versions, dict):
        return False
    for name, t in times.items():
        if not isinstance(name, str) or isinstance(t, bool) or not isinstance(t, (int, float)):
            return False
        if not (math.isfinite(t) and t > 0):
            return False
    if not all(isinstance(n, str) and isinstance(r, str) for n, r in failed.items()):
        return False
    if not all(isinstance(n, str) and isinstance(v, str) for n, v in versions.items()):
        return False
    return isinstance(e.get("measured", ""), str) and bool(times or failed)


def parse(text: str, origin: str = "autotune cache") -> Dict[str, dict]:
    """Validate the file's text and return {machine key: {"machine": dict, "entries": {sig: entry}}}.

    Raises ValueError for a file that is not ours (wrong format or version, not JSON); drops single
    malformed sections or entries with one warning."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ValueError(f"not an attnpatch autotune file (format is not {FILE_FORMAT!r})")
    if data.get("version") != FILE_VERSION:
        raise ValueError(f"file version {data.get('version')!r}; this attnpatch reads version {FILE_VERSION}")
    machines = data.get("machines")
    if not isinstance(machines, dict):
        raise ValueError("'machines' is not an object")
    out: Dict[str, dict] = {}
    dropped = 0
    for mkey, section in machines.items():
        if not isinstance(section, dict) or not isinstance(section.get("entries"), dict):
            dropped += 1
            continue
        entries = {}
        for skey, e in section["entries"].items():
            if isinstance(skey, str) and _valid_entry(e):
                entries[skey] = e
            else:
                dropped += 1
        machine = section.get("machine") if isinstance(section.get("machine"), dict) else {}
        out[mkey] = {"machine": machine, "updated": str(section.get("updated", "")), "entries": entries}
    if dropped:
        logger.warning("attnpatch: %s: ignored %d malformed section(s) or entr(y/ies); they will be measured again",
                       origin, dropped)
    return out


def _serialise(machines: Dict[str, dict]) -> str:
    return json.dumps({"format": FILE_FORMAT, "version": FILE_VERSION, "machines": machines}, indent=1,
                      sort_keys=True)


class Unusable(Exception):
    """The cache file exists but could not be read or understood: it is never written over."""


def _load(path: pathlib.Path) -> Dict[str, dict]:
    """The file's sections; {} when there is no file. Raises `Unusable` for a file that is there but
    could not be read or is not an attnpatch cache of this version (see `attnpatch.diskfile`)."""
    try:
        text = diskfile.read_text(path)
    except diskfile.Refused as exc:
        raise Unusable(str(exc)) from None
    if text is None:
        return {}
    try:
        return parse(text, str(path))
    except ValueError as exc:
        raise Unusable(f"{path}: {exc}") from None


def _read_file(path: pathlib.Path) -> Dict[str, dict]:
    """The file's sections, or {} (with a warning once) when it is missing, unreadable or not ours."""
    try:
        return _load(path)
    except Unusable as exc:
        _warn_once(("unusable", str(path), str(exc)),
                   "attnpatch: not using the autotune cache: %s. Choices are measured again and kept in memory; "
                   "the file is left as it is (`attnpatch autotune --clear` removes an attnpatch cache, or set "
                   "ATTNPATCH_CACHE_DIR to another folder).", exc)
        return {}


def _prune(machines: Dict[str, dict]) -> None:
    if len(machines) > MAX_MACHINES:
        for mkey in sorted(machines, key=lambda m: machines[m].get("updated", ""))[:len(machines) - MAX_MACHINES]:
            del machines[mkey]
    for section in machines.values():
        entries = section["entries"]
        if len(entries) > MAX_ENTRIES:
            for skey in sorted(entries, key=lambda s: entries[s].get("measured", ""))[:len(entries) - MAX_ENTRIES]:
                del entries[skey]


def persist(path: pathlib.Path, mkey: str, machine: dict, skey: str, entry: dict) -> bool:
    """Merge one entry into the file under the lock and replace the file atomically. Returns False
    (with a warning) when the file cannot be written; the choice still holds in memory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with diskfile.locked(path):
            machines = _load(path)  # never write over a file that could not be read
            diskfile.check_replaceable(path)
            section = machines.setdefault(mkey, {"machine": machine, "updated": "", "entries": {}})
            section["machine"] = machine
            section["entries"][skey] = entry
            section["updated"] = entry.get("measured", _now())
            _prune(machines)
            diskfile.replace_text(path, _serialise(machines))
        return True
    except (OSError, Unusable) as exc:
        _warn_once(("write", str(path)), "attnpatch: not writing the autotune cache (%s); measured choices "
                   "are kept in memory only", exc)
        return False


class _Store:
    """The entries of one cache file in memory: loaded once, updated on each measurement."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.machines: Dict[str, dict] = _read_file(path)
        self.loaded_from_disk = {(m, s) for m, sec in self.machines.items() for s in sec["entries"]}
        self.stale_checked: set = set()
        self.writable = True  # False after a write failed: later choices stay in memory, no retry per call

    def get(self, mkey: str, skey: str) -> Optional[dict]:
        section = self.machines.get(mkey)
        if section is None:
            if mkey not in self.stale_checked:
                self.stale_checked.add(mkey)
                if self.machines:
                    logger.info("attnpatch: the autotune cache %s has no entries for this machine (%s); entries for "
                                "other GPUs, drivers or torch versions are ignored", self.path, mkey)
            return None
        return section["entries"].get(skey)

    def put(self, mkey: str, machine: dict, skey: str, entry: dict) -> None:
        section = self.machines.setdefault(mkey, {"machine": machine, "updated": "", "entries": {}})
        section["entries"][skey] = entry
        section["updated"] = entry["measured"]
        if self.writable:
            self.writable = persist(self.path, mkey, machine, skey, entry)


def _store() -> _Store:
    path = cache_path()
    key = str(path)
    s = _STORES.get(key)
    if s is None:
        s = _Store(path)
        _STORES[key] = s
    return s


# -- public cache API ----------------------------------------------------------------------------

def _is_own_file(path: pathlib.Path) -> bool:
    """Whether ``path`` holds an attnpatch autotune cache (any version) or a corrupt one (not JSON),
    which `clear_cache` may remove; False for another program's JSON file or an unreadable file."""
    try:
        text = diskfile.read_text(path)
    except diskfile.Refused:
        return False
    if text is None:
        return True
    try:
        data = json.loads(text)
    except ValueError:
        return True
    return isinstance(data, dict) and data.get("format") == FILE_FORMAT


#: Called after `clear_cache` (the router adds its own `clear_cache`, so decisions made from the removed
#: measurements are made again).
ON_CLEAR: List[Callable[[], None]] = []


def clear_cache() -> int:
    """Remove every measured choice (in memory and the file on disk); return how many entries were
    removed. Cached router decisions are dropped too, so the next calls decide again."""
    path = cache_path()
    with _LOCK:
        seen = set()
        for s in _STORES.values():
            if s.path == path:
                seen |= {(m, k) for m, sec in s.machines.items() for k in sec["entries"]}
        try:
            with diskfile.locked(path) if path.parent.exists() else contextlib.nullcontext():
                try:
                    seen |= {(m, k) for m, sec in _load(path).items() for k in sec["entries"]}
                except Unusable as exc:
                    if not _is_own_file(path):
                        raise diskfile.Refused(f"{exc}; not removed: it is not an attnpatch cache") from None
                st = diskfile.check_replaceable(path)
                if st is not None:
                    path.unlink()
        except OSError as exc:
            logger.warning("attnpatch: cannot remove the autotune cache %s: %s", path, exc)
        _STORES.pop(str(path), None)
    for hook in ON_CLEAR:  # the router's cached decisions (it registers itself: no import of the router here)
        hook()
    return len(seen)


def cached_choices() -> List[dict]:
    """The measured choices for the file at `cache_path()` (every machine section), for the CLI."""
    out = []
    with _LOCK:
        for mkey, sec in _store().machines.items():
            for skey, e in sec["entries"].items():
                out.append({"machine": mkey, "signature": skey, **e})
    return out


def reset_memory() -> None:
    """Forget what was loaded or measured in this process (tests; after editing the file by hand)."""
    with _LOCK:
        _STORES.clear()
        _MACHINES.clear()
        _WARNED.clear()


@contextlib.contextmanager
def override_timer(timer: Timer, devices: Sequence[str] = ("cpu", "cuda")) -> Iterator[None]:
    """Use ``timer(backend, call) -> ms`` instead of running kernels, on ``devices`` (tests, tools)."""
    global _TIMER, _TIMER_DEVICES
    with _LOCK:
        saved = (_TIMER, _TIMER_DEVICES)
        _TIMER, _TIMER_DEVICES = timer, tuple(devices)
    try:
        yield
    finally:
        with _LOCK:
            _TIMER, _TIMER_DEVICES = saved


# -- timing ----------------------------------------------------------------------------------------

def _device(call: Call) -> torch.device:
    return torch.device(call.device_type, call.device_index) if call.device_index is not None else torch.device(call.device_type)


def make_inputs(call: Call, layout: str, generator: Optional[torch.Generator] = None):
    """Fresh random q, k, v (and mask, as the router hands it to runners) of ``call``'s shape in
    ``layout``; requires_grad when the call needs gradients."""
    dev = _device(call)
    b, hq, hkv, sq, skv, d, dv = (call.batch, call.heads_q, call.heads_kv, call.seq_q, call.seq_kv,
                                  call.head_dim, call.head_dim_v)

    def shape(h, s, dim):
        return (b, h, s, dim) if layout == "bnsd" else (b, s, h, dim)

    kw = dict(device=dev, dtype=call.dtype, generator=generator)
    q = torch.randn(shape(hq, sq, d), **kw)
    k = torch.randn(shape(hkv, skv, d), **kw)
    v = torch.randn(shape(hkv, skv, dv), **kw)
    if call.needs_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = None
    if call.mask_kind != "none":
        mshape = tuple(call.mask_shape)
        if call.mask_kind == "bool":
            mask = torch.rand(mshape, device=dev, generator=generator) > 0.1
            mask[..., 0] = True  # every row keeps a key
        else:
            mask = torch.randn(mshape, device=dev, dtype=call.dtype, generator=generator)
    return q, k, v, mask


def measure(backend, call: Call) -> float:
    """Median ms per call of ``backend`` on random inputs of ``call``'s shape: one warm-up call, then
    samples sized to `BUDGET_MS` (on CUDA timed by events in one stream, `_stream_ms`; the host clock
    elsewhere). Forward and backward when the call needs gradients."""
    dev = _device(call)
    cuda = dev.type == "cuda"
    runner = backend.build(call)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    nbytes = call.batch * (call.heads_q * call.seq_q * call.head_dim + call.heads_kv * call.seq_kv *
                           (call.head_dim + call.head_dim_v)) * torch.finfo(call.dtype).bits // 8
    sets = [make_inputs(call, backend.NATIVE_LAYOUT, gen) for _ in range(2 if nbytes < (256 << 20) else 1)]
    grad_out = None
    it = [0]

    def once():
        q, k, v, m = sets[it[0] % len(sets)]
        it[0] += 1
        out = runner(q, k, v, m, call.is_causal, call.scale, call.dropout_p)
        if call.needs_grad:
            nonlocal grad_out
            if grad_out is None:
                grad_out = torch.ones_like(out)
            torch.autograd.grad(out, (q, k, v), grad_out)

    def cuda_event():
        return torch.cuda.Event(enable_timing=True)

    def hold(ms):
        _hold_gpu(dev, ms)

    def host_sample(n):
        t0 = time.perf_counter()
        for _ in range(n):
            once()
        return (time.perf_counter() - t0) * 1e3 / n

    # Dropout draws from the global generators: put their state back so that timing leaves the
    # user's random streams where they were.
    # Events and the lead go to the current stream of the current device: make that the call's device.
    with torch.random.fork_rng(devices=[dev] if cuda else [], device_type=dev.type), \
            (torch.cuda.device(dev) if cuda else contextlib.nullcontext()), \
            (torch.enable_grad() if call.needs_grad else torch.no_grad()):
        once()  # warm-up: lazy init, kernel selection, compilation
        if cuda:
            torch.cuda.synchronize(dev)
        # first estimate (from an idle GPU, host launch included): only sizes the samples
        est = max(_stream_ms(once, 1, 1, 0.0, hold, cuda_event)[0] if cuda else host_sample(1), 1e-4)
        inner = max(1, min(MAX_INNER, math.ceil(MIN_SAMPLE_MS / est)))
        n = max(MIN_SAMPLES, min(MAX_SAMPLES, int(BUDGET_MS / (est * inner))))
        if cuda:
            times = sorted(_stream_ms(once, n, inner, est if est < LEAD_BELOW_MS else 0.0, hold, cuda_event))
        else:
            times = sorted(host_sample(inner) for _ in range(n))
    del sets
    return times[len(times) // 2]


def _stream_ms(once: Callable[[], object], n: int, inner: int, lead_ms: float, hold: Callable[[float], None],
               new_event: Callable[[], object]) -> List[float]:
    """ms per call of ``n`` samples of ``inner`` calls of ``once``, timed in one stream: ``hold(lead_ms)``
    queues that much GPU-only work (no host cost) ahead of the first event, then the samples run back to
    back with an event between each and one synchronisation at the end.

    The host starts ``lead_ms`` ahead of the GPU, as in a model whose other layers keep the GPU busy,
    and while a call launches faster than its kernels run that lead grows from sample to sample, so a
    host hiccup (a collection, a Python wrapper's slow path) shows in a sample only when it outlasts the
    lead. A call whose launch is slower than its kernels (host-bound: decoding) spends the lead within a
    few calls and then measures its launch, as it costs in a model."""
    events = [new_event() for _ in range(n + 1)]
    if lead_ms > 0:
        hold(lead_ms)
    events[0].record()
    for e in events[1:]:
        for _ in range(inner):
            once()
        e.record()
    events[-1].synchronize()
    return [a.elapsed_time(b) / inner for a, b in zip(events, events[1:])]


#: GPU clock cycles per ms of ``torch.cuda._sleep``, per device index (measured once per process).
_SLEEP_CYCLES_PER_MS: Dict[int, float] = {}


def _hold_gpu(device: torch.device, ms: float) -> None:
    """Queue about ``ms`` of GPU-only work on the current stream: torch's spin kernel
    (``torch.cuda._sleep``, in torch since 1.x), its cycles per ms measured on first use. A torch without
    it gets no lead (timing then starts from an idle GPU), with a warning."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        _warn_once(("no _sleep",), "attnpatch: torch.cuda._sleep is missing in torch %s; autotune times short "
                   "calls without a GPU-side lead", torch.__version__)
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    rate = _SLEEP_CYCLES_PER_MS.get(index)
    if rate is None:
        cycles = 1_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        sleep(cycles)
        end.record()
        end.synchronize()
        rate = _SLEEP_CYCLES_PER_MS[index] = cycles / max(start.elapsed_time(end), 1e-3)
    sleep(int(rate * ms))


def _timer_for(call: Call) -> Optional[Timer]:
    if _TIMER is not None and call.device_type in (_TIMER_DEVICES or ()):
        return _TIMER
    if call.device_type in TIMED_DEVICES:
        return measure
    return None


def applies(call: Call, env) -> bool:
    """Whether auto should consult measurements for this call (cheap: a decision miss asks it)."""
    return bool(env.autotune) and _timer_for(call) is not None


def _capturing(call: Call) -> bool:
    if call.device_type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:
        return False


# -- choosing ----------------------------------------------------------------------------------------

def _pick(order: Sequence, times: Dict[str, float]):
    """The fastest of ``order`` (backends) by ``times``; ties within TIE_MARGIN go to the earlier one."""
    timed = [b for b in order if b.NAME in times]
    if not timed:
        return None
    best = min(times[b.NAME] for b in timed)
    for b in timed:
        if times[b.NAME] <= best * (1 + TIE_MARGIN):
            return b
    return None  # pragma: no cover


#: The backend that runs what the model would run without attnpatch (torch's own SDPA dispatch): always
#: timed when eligible, even past MAX_TIMED, so auto never settles on something slower than doing nothing.
STOCK_BACKEND = "sdpa"


def _to_time(eligible: Sequence) -> List:
    """The candidates to time: the first MAX_TIMED timeable ones in static-table order, plus the stock
    backend where it is eligible and not among them (on an H200 with FlashAttention 3 installed, the
    four ahead of it lost to it at ViT's shape by 25%: 2026-11-30, docs/GPU_BACKENDS.md)."""
    timeable = [b for b in eligible if getattr(b, "AUTOTUNE_TIMED", True)]
    out = timeable[:MAX_TIMED]
    stock = next((b for b in timeable[MAX_TIMED:] if b.NAME == STOCK_BACKEND), None)
    if stock is not None:
        out.append(stock)
    return out


def _usable(entry: Optional[dict], candidates: Sequence, versions: Dict[str, str]) -> bool:
    """An entry answers for this call when it timed (or saw fail) every candidate, at the installed
    versions."""
    if entry is None or entry.get("method") != TIMING_METHOD:
        return False
    seen = set(entry["times_ms"]) | set(entry.get("failed", {}))
    for b in candidates:
        if b.NAME not in seen or entry["versions"].get(b.NAME) != versions[b.NAME]:
            return False
    return True


def _from_entry(entry: dict, eligible: Sequence, candidates: Sequence):
    # Only backends the router found eligible can come out of here, whatever the entry says.
    return _pick(candidates, entry["times_ms"]) or next(
        (b for b in eligible if b.NAME not in entry.get("failed", {})), None)


def choose(call: Call, eligible: Sequence) -> Optional[Tuple[object, str]]:
    """Pick among ``eligible`` (backends the router found eligible, in static-table order) by measured
    speed. Returns (backend, how it was chosen) or None to let the static table decide. Never raises."""
    try:
        return _choose(call, list(eligible))
    except Exception as exc:  # autotune must never break a call
        _warn_once(("choose", type(exc).__name__, str(exc)),
                   "attnpatch: autotune failed (%s: %s); using the static table", type(exc).__name__, exc)
        return None


def _choose(call: Call, eligible: List) -> Optional[Tuple[object, str]]:
    timer = _timer_for(call)
    if timer is None or len(eligible) < 2:
        return None
    candidates = _to_time(eligible)
    if len(candidates) < 2:
        return None
    versions = _versions(candidates)
    mkey, machine = _machine(call)
    skey = signature_key(call)
    with _LOCK:
        # a shipped rule for a cost that timing cannot see (decoding's per-length cuDNN graphs) wins first
        shipped = shipped_tables.choice(call, eligible, over_measurement=True)
        if shipped is not None:
            return shipped
        store = _store()
        entry = store.get(mkey, skey)
        if _usable(entry, candidates, versions):
            chosen = _from_entry(entry, eligible, candidates)
            if chosen is not None:
                how = "measured" if (mkey, skey) not in store.loaded_from_disk else "cached"
                return chosen, f"{how} {entry.get('measured', '')}".strip()
        shipped = shipped_tables.choice(call, eligible)  # a measured card: no timing in a fresh process
        if shipped is not None:
            return shipped
        where = ("torch.compile" if call.compiling or torch.compiler.is_compiling()
                 else "CUDA graph capture" if _capturing(call) else None)
        if where is not None:  # never time here: the static table decides until a measurement exists
            return eligible[0], f"static table; not measured during {where}"
        times: Dict[str, float] = {}
        failed: Dict[str, str] = {}
        t0 = time.perf_counter()
        for b in candidates:
            try:
                ms = float(timer(b, call))
                if not (math.isfinite(ms) and ms > 0):
                    raise ValueError(f"timer returned {ms!r}")
                times[b.NAME] = ms
            except Exception as exc:
                failed[b.NAME] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                logger.warning("attnpatch: autotune dropped %r for %s: it raised %s", b.NAME,
                               call.describe(), failed[b.NAME])
        spent = (time.perf_counter() - t0) * 1e3
        chosen = _pick(candidates, times)
        if chosen is None:
            return None
        entry = {
            "backend": chosen.NAME, "times_ms": times, "failed": failed, "versions": versions,
            "measured": _now(), "call": call.describe(), "spent_ms": round(spent, 3), "method": TIMING_METHOD,
        }
        store.put(mkey, machine, skey, entry)
        store.loaded_from_disk.discard((mkey, skey))
        if logger.isEnabledFor(logging.INFO):
            logger.info("attnpatch: autotune %s -> %s (%s; %.1f ms spent timing)", call.describe(), chosen.NAME,
                        ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda x: x[1])), spent)
        return chosen, f"measured {entry['measured']}"

