"""What the benchmarks record about the machine they ran on."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict:
    """CPU, cores, memory, Python and platform of this machine."""
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": mem, "python": platform.python_version(),
            "platform": platform.platform()}


def torch_info(device: str, threads: int | None = None) -> dict:
    """torch / transformers versions, threads, OpenMP wait policy, device and GPU (benchmarks that run models)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    d = {"torch": torch.__version__, "transformers": transformers.__version__,
         "torch_threads": threads if threads is not None else torch.get_num_threads(),
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)"),
         "device": device, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d
