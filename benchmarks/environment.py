"""Facts about the machine and software a benchmark ran on, recorded next to its results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch


def _git_commit() -> str | None:
    """The commit of the piggyback source imported (a worktree's, under PYTHONPATH), not of the
    directory the benchmark was started from."""
    import piggyback

    source = Path(piggyback.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    packages = ("piggyback", "torch", "torchvision", "timm", "safetensors", "numpy")
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": versions,
        "git_commit": _git_commit(),
    }


def save_report(out, settings: dict, results, table: str, env: dict | None = None) -> dict:
    """Write results.json (command, settings, results, environment) and table.md into `out`,
    print the table, and return the report."""
    report = {
        "command": " ".join(sys.argv),
        "settings": settings,
        "results": results,
        "environment": env or environment(),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(table)
    return report
