"""Run-time device choice: cuda > mps > cpu, overridable by setting or ``ANYFACE_DEVICE``."""

from __future__ import annotations

import os

import torch

ENV_VAR = "ANYFACE_DEVICE"


def available_devices() -> list[str]:
    """Devices usable in this process, best first."""
    out = []
    if torch.cuda.is_available():
        out += [f"cuda:{i}" if i else "cuda" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out


def pick_device(preference: str | None = None) -> torch.device:
    """Return the device to run models on.

    ``preference`` (a setting) wins over ``$ANYFACE_DEVICE``; ``None``/``"auto"`` picks
    cuda > mps > cpu. An unavailable explicit choice raises ``ValueError`` naming the usable ones.
    """
    pref = preference or os.environ.get(ENV_VAR) or "auto"
    pref = pref.strip().lower()
    if pref == "auto":
        return torch.device(available_devices()[0])
    ok = available_devices()
    try:
        dev = torch.device(pref)
    except RuntimeError:  # torch's own message lists every device type it was built with
        raise ValueError(f"'{pref}' is not a device name. Available here: {', '.join(ok)} (or auto)") from None
    if dev.type == "cpu" or str(dev) in ok or (dev.type == "cuda" and dev.index is None and "cuda" in ok):
        return dev
    raise ValueError(f"Device '{pref}' is not available here. Available: {', '.join(ok)}")


def describe(device: torch.device | str) -> str:
    """Human-readable device name for the status bar."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"
