"""Shared helpers for benchmark scripts: machine description and result files.

Every benchmark writes `benchmarks/results/<name>.json` (the payload plus date, command, machine
and package versions) and `benchmarks/results/<name>.md` (a markdown table with the same
provenance), then prints the command that made them (STYLE.md §12).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from forecaster.files import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_PACKAGES = (
    "numpy",
    "pandas",
    "statsmodels",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "pydantic",
)


def package_versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed versions of `packages` (absent ones are left out), without importing them."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU, cores usable by this process, memory, load average and OS of the running machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": _memory_gib(),
        "load_average_1_5_15": [round(v, 2) for v in load] if load else None,
        "platform": platform.platform(),
    }


def command_line() -> str:
    """The command that ran this process, with the interpreter as `python`."""
    return shlex.join(["python", *sys.argv])


def write_results(
    name: str, payload: dict[str, Any], table_md: str, *, results_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write `<name>.json` (payload + provenance) and `<name>.md`; return both paths.

    The provenance keys `benchmark`, `date`, `command`, `machine` and `versions` are added
    unless the payload already sets them. Files are written to a temporary name and renamed.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    record = {
        "benchmark": name,
        "date": date,
        "command": command_line(),
        "machine": machine_info(),
        "versions": package_versions(),
        **payload,
    }
    json_path = results_dir / f"{name}.json"
    md_path = results_dir / f"{name}.md"
    machine = record["machine"]
    footer = (
        f"\n\nGenerated {record['date']} by `{record['command']}` on {machine['cpu']} "
        f"({machine['usable_cpus']} usable CPUs, load average "
        f"{machine['load_average_1_5_15']}); versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + ".\n"
    )
    for path, text in (
        (json_path, json.dumps(record, indent=2, sort_keys=False) + "\n"),
        (md_path, table_md.rstrip() + footer),
    ):
        atomic_write_text(path, text)
    print(f"wrote {json_path} and {md_path}\ncommand: {record['command']}")
    return json_path, md_path
