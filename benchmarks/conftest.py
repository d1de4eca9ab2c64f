"""Benchmark set-up: machine naming and helpers shared by the per-op benchmark files.

Run: ``pytest benchmarks --benchmark-json benchmarks/results/<machine>.json`` (see README).
"""

import os
import platform

import pytest
import torch


def machine_name() -> str:
    """A short name for the hardware, used in result files and tables."""
    if os.environ.get("LESIONKIT_MACHINE"):
        return os.environ["LESIONKIT_MACHINE"]
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-").lower()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} threads={torch.get_num_threads()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def machine() -> str:
    return machine_name()


# The 1-minute load when the session started: a ratio measured while other jobs compete for the
# cores compares schedulers, not kernels (OpenMP peers collapse under oversubscription).
_LOAD_AT_START: list[float] | None = None


def pytest_sessionstart(session):
    global _LOAD_AT_START
    if hasattr(os, "getloadavg"):
        _LOAD_AT_START = list(os.getloadavg())


def load_record(before: list[float] | None, after: list[float] | None) -> dict:
    """The load facts every result file carries, and whether its ratios may be quoted: only when
    the 1-minute load stayed at or below the core count from start to end."""
    cores = os.cpu_count() or 1
    worst = max(v[0] for v in (before, after) if v) if (before or after) else None
    return {
        "cores": cores,
        "load_average_1_5_15_min_at_start": before,
        "load_average_1_5_15_min_at_end": after,
        "quotable": worst is not None and worst <= cores,
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"]["lesionkit_machine"] = machine_name()
    output_json["machine_info"]["torch"] = torch.__version__
    output_json["machine_info"]["threads"] = torch.get_num_threads()
    end = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    output_json["machine_info"].update(load_record(_LOAD_AT_START, end))
