"""The machine a bench ran on, recorded in its ``results.json`` and read back by ``replicates``.

Speed ratios depend on the CPU kind (a wide denoising pass is cheap where a
narrow one is not), and so, on 2 CPU cores, do the trained models themselves:
the same seed has trained different models on an AMD EPYC and an Intel Xeon.
So a run records which CPU it had, not only how many threads.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo``), which tell
    apart kinds that share a name (``Intel(R) Xeon(R) Processor`` covers several).

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the machine when None.
            Where there is none (macOS, Windows), ``platform.processor()`` or
            the architecture stands in.
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block is enough
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def machine_info(threads: int) -> dict[str, Any]:
    """What a run's speeds depend on: CPU, vector instructions torch uses, threads, torch, GPU."""
    import torch

    return {
        "threads": threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def describe(machine: Any) -> str:
    """One line for a ``results.json``'s ``machine``: the CPU, its vector instructions and any GPU."""
    if not isinstance(machine, dict) or "cpu" not in machine:
        return "CPU not recorded (a run from before pdlightning recorded it)"
    text = f"{machine['cpu']}, {machine.get('cpu_capability') or 'unknown ISA'}"
    return f"{text}, {machine['gpu']}" if machine.get("gpu") else text
