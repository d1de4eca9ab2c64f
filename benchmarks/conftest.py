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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"]["lesionkit_machine"] = machine_name()
    output_json["machine_info"]["torch"] = torch.__version__
    if hasattr(os, "getloadavg"):  # results on a shared machine mean little without it
        output_json["machine_info"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
