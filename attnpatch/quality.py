"""How far one output moved from a reference: PSNR, SSIM, relative L2, max abs difference, cosine.

`attnpatch.calibrate` compares whole runs with these (a calibrated recipe against the exact run, and
two exact kernels against each other for the floor). Conventions:

* ``rel_l2`` = ‖out − ref‖₂ / ‖ref‖₂ over all elements (0 when equal).
* ``psnr_db`` = 10·log10(range² / mean((out − ref)²)) in dB, ``inf`` when equal. ``range`` is the
  reference's data range: 1 for values in [0, 1] (images and video from diffusers with
  ``output_type="pt"`` / ``"np"``), 2 for values in [-1, 1], 255 for uint8 data, else ``max − min``
  of the reference (latents, logits).
* ``ssim``: the mean structural similarity of Wang et al. (2004) — Gaussian window 11, σ = 1.5,
  K1 = 0.01, K2 = 0.03, "valid" filtering, per channel, averaged over channels and images — computed
  only for outputs that look like images or video: 3 or more dims with 1, 3 or 4 channels, either
  channels-first ``(…, C, H, W)`` (torch) or channels-last ``(…, H, W, C)`` (numpy / PIL), and H, W
  of at least 7. Leading dims (batch, frames) are images. None for other outputs.
* ``cosine``: cosine similarity of the flattened outputs.

Everything is computed in float64 on the CPU for small outputs and in float32 on the output's device
for large ones (over `FLOAT64_MAX_ELEMENTS`), chunked over images for SSIM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

#: Outputs with more elements than this are compared in float32 on their own device.
FLOAT64_MAX_ELEMENTS = 1 << 24
#: Images per SSIM chunk (bounds the memory of the filtered maps).
SSIM_CHUNK = 16
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_IMAGE_CHANNELS = (1, 3, 4)


def to_tensor(output: Any) -> torch.Tensor:
    """The tensor to compare from whatever a run returned: a tensor, a numpy array, PIL images, a
    diffusers / transformers output (``images``, ``frames``, ``sample``, ``logits``,
    ``last_hidden_state``), or the first convertible item of a tuple, list or dict."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if output is None:
        raise TypeError("attnpatch.calibrate: run(target) returned None; return the output to compare "
                        "(e.g. `return pipe(...).images` or the model's output)")
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np = None
    if np is not None and isinstance(output, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(output))
    if _is_pil(output):
        return torch.from_numpy(np.asarray(output).copy())
    for attr in ("images", "frames", "videos", "sample", "logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if value is not None:
            return to_tensor(value)
    if isinstance(output, (list, tuple)) and output:
        if all(_is_pil(x) or (np is not None and isinstance(x, np.ndarray)) for x in output):
            return torch.stack([to_tensor(x) for x in output])
        for item in output:
            try:
                return to_tensor(item)
            except TypeError:
                continue
    if isinstance(output, dict):
        for item in output.values():
            try:
                return to_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"attnpatch.calibrate: cannot compare an output of type {type(output).__name__}; have "
                    "run(target) return a tensor, a numpy array, PIL images or a diffusers/transformers output")


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.")


def _as_float(out: torch.Tensor, ref: torch.Tensor):
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"attnpatch.quality: outputs have different shapes {tuple(out.shape)} and {tuple(ref.shape)}")
    if ref.numel() <= FLOAT64_MAX_ELEMENTS:
        return out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    return out.detach().float(), ref.detach().to(out.device, torch.float32)


def data_range(ref: torch.Tensor) -> float:
    """The PSNR/SSIM data range of a reference (see the module docstring)."""
    if ref.dtype == torch.uint8:
        return 255.0
    r = ref.detach().float()
    if r.numel() == 0:
        return 1.0
    lo, hi = r.min().item(), r.max().item()
    if lo >= 0.0 and hi <= 1.0:
        return 1.0
    if lo >= -1.0 and hi <= 1.0:
        return 2.0
    return max(hi - lo, 1e-12)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (0 when equal, inf when the reference is zero and they differ)."""
    a, b = _as_float(out, ref)
    num = (a - b).norm().item()
    den = b.norm().item()
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = _as_float(out, ref)
    return (a - b).abs().max().item() if a.numel() else 0.0


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1 when equal; 0 when either is zero)."""
    a, b = _as_float(out, ref)
    a, b = a.flatten(), b.flatten()
    if torch.equal(a, b):
        return 1.0
    den = a.norm().item() * b.norm().item()
    return (a @ b).item() / den if den > 0 else 0.0


def psnr(out: torch.Tensor, ref: torch.Tensor, range_: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB (inf when equal); ``range_`` defaults to `data_range(ref)`."""
    rng = data_range(ref) if range_ is None else float(range_)
    a, b = _as_float(out, ref)
    mse = (a - b).pow(2).mean().item() if a.numel() else 0.0
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(rng * rng / mse)


def image_layout(shape) -> Optional[str]:
    """"channels_first", "channels_last" or None (not an image or video) for an output's shape."""
    if len(shape) < 3:
        return None
    first = shape[-3] in _IMAGE_CHANNELS and min(shape[-2], shape[-1]) >= SSIM_WINDOW // 2 + 2
    last = shape[-1] in _IMAGE_CHANNELS and min(shape[-3], shape[-2]) >= SSIM_WINDOW // 2 + 2
    if first and not last:
        return "channels_first"
    if last and not first:
        return "channels_last"
    if first and last:  # e.g. (3, 8, 3): prefer torch's convention
        return "channels_first"
    return None


def _gaussian(window: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(out: torch.Tensor, ref: torch.Tensor, range_: Optional[float] = None) -> Optional[float]:
    """Mean SSIM of two images / videos (see the module docstring), or None when the output does not
    look like images. 1 when equal."""
    layout = image_layout(tuple(ref.shape))
    if layout is None:
        return None
    rng = data_range(ref) if range_ is None else float(range_)
    a, b = _as_float(out, ref)
    if layout == "channels_last":
        a, b = a.movedim(-1, -3), b.movedim(-1, -3)
    c, h, w = a.shape[-3:]
    a = a.reshape(-1, c, h, w)
    b = b.reshape(-1, c, h, w)
    win = min(SSIM_WINDOW, h, w)
    win -= 1 - win % 2  # odd
    g = _gaussian(win, SSIM_SIGMA, a.dtype, a.device)
    kx = g.view(1, 1, 1, win).expand(c, 1, 1, win)
    ky = g.view(1, 1, win, 1).expand(c, 1, win, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    c1 = (SSIM_K1 * rng) ** 2
    c2 = (SSIM_K2 * rng) ** 2
    total = 0.0
    count = 0
    for i in range(0, a.shape[0], SSIM_CHUNK):
        x, y = a[i:i + SSIM_CHUNK], b[i:i + SSIM_CHUNK]
        mx, my = blur(x), blur(y)
        sxx = blur(x * x) - mx * mx
        syy = blur(y * y) - my * my
        sxy = blur(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        total += m.sum().item()
        count += m.numel()
    return total / count if count else None


@dataclass
class OutputMetrics:
    """How far an output moved from its reference (see the module docstring for each number)."""

    psnr_db: float
    rel_l2: float
    max_abs: float
    cosine: float
    ssim: Optional[float] = None
    shape: tuple = ()

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def describe(self) -> str:
        ssim = "" if self.ssim is None else f", SSIM {self.ssim:.5f}"
        return f"PSNR {format_db(self.psnr_db)}{ssim}, rel L2 {self.rel_l2:.3g}, max abs {self.max_abs:.3g}"


def format_db(x: float) -> str:
    return "inf dB (identical)" if math.isinf(x) else f"{x:.2f} dB"


def compare(out: Any, ref: Any) -> OutputMetrics:
    """Every metric of ``out`` against ``ref`` (each converted with `to_tensor`)."""
    a, b = to_tensor(out), to_tensor(ref)
    return OutputMetrics(psnr_db=psnr(a, b), rel_l2=rel_l2(a, b), max_abs=max_abs(a, b), cosine=cosine(a, b),
                         ssim=ssim(a, b), shape=tuple(b.shape))
