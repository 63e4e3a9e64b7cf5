"""Metrics of a run: per-step rows (metrics.csv + TensorBoard), held-out rows (eval.csv),
MFU against a measured (CPU) or published (GPU) peak, and memory probes.

Values stay on the training device and are summed there; ranks all-reduce one vector per
logging interval (NCCL reduces device tensors, gloo CPU ones: a CPU tensor on an NCCL
group is what crashed multi-GPU runs)."""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path
from typing import Mapping

import torch


class DeviceSums:
    """Running sums of detached metric tensors, kept on their device (no host sync per
    micro-batch); `reduce()` all-reduces them across ranks once and returns floats."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: Mapping[str, torch.Tensor | float], weight: torch.Tensor | float | None = None) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v, device=self.device).detach().to(torch.float64)
            if weight is not None:
                v = v * weight
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def reduce(self, world: int) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        vec = torch.stack([self.sums[k].reshape(()) for k in names])
        if world > 1:
            torch.distributed.all_reduce(vec)
        self.sums = {}
        return dict(zip(names, vec.tolist()))  # the one host sync of the interval


def gather_per_rank(value: float, rank: int, world: int, device: torch.device) -> list[float]:
    vec = torch.zeros(world, dtype=torch.float64, device=device)
    vec[rank] = value
    if world > 1:
        torch.distributed.all_reduce(vec)
    return vec.tolist()


# ----------------------------------------------------------------------------- peaks

# Dense peak FLOP/s by exact model and precision (vendor datasheets, SXM where a card has
# variants; "fp32" is plain FP32, not TF32). Matched on the model token of the device name.
GPU_PEAK = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
    "A10G": {"bf16": 70e12, "fp32": 31.2e12},
}


def gpu_peak_flops(device_name: str, precision: str) -> float:
    """Peak for `torch.cuda.get_device_name()` ("NVIDIA L40S", "NVIDIA H100 PCIe", ...) at the
    run's precision; 0.0 for an unknown model (MFU is then reported as 0, never guessed)."""
    tokens = re.split(r"[\s\-_]+", device_name.replace("NVIDIA", "").strip())
    if not tokens or not tokens[0]:
        return 0.0
    model = tokens[0].upper()
    if len(tokens) > 1 and f"{model} {tokens[1]}" in GPU_PEAK:
        model = f"{model} {tokens[1]}"
    return GPU_PEAK.get(model, {}).get(precision, 0.0)


def gemm_peak_flops(size: int = 1024, seconds: float = 1.0, trials: int = 10) -> float:
    """Measured fp32 GEMM FLOP/s of this process's threads (the CPU 'peak' for MFU): the best
    of `trials` short timings, so a moment of contention from other processes does not lower
    the peak (which would inflate MFU)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / trials:
                best = max(best, 2.0 * size**3 * n / dt)
                break
    return best


def cpu_peak_flops(threads: int) -> float:
    """The GEMM probe with `threads` torch threads (a worker's share of a node), kept as the
    best value ever measured on this machine (~/.cache/cloze/peak_flops.json): a peak is a
    maximum, and one probe that meets other processes' load would inflate every MFU of a run."""
    keep = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        measured = gemm_peak_flops()
    finally:
        torch.set_num_threads(keep)
    cache = Path(os.environ.get("CLOZE_CACHE_DIR", Path.home() / ".cache" / "cloze")) / "peak_flops.json"
    key = f"{cpu_model()}|{max(1, threads)} threads|torch {torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(key, 0.0)))
    if best > float(known.get(key, 0.0)):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({**known, key: best}, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
    return best


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- files

class MetricsWriter:
    """metrics.csv (+ eval.csv) + TensorBoard events in a local folder (rank 0). A restarted
    worker re-writes the steps after its checkpoint; readers keep the last row per step."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        self.columns: dict[str, list[str]] = {}
        self.tb = None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.folder / "tb"))
            except Exception:  # tensorboard not installed: CSV only
                self.tb = None

    def write(self, metrics: Mapping[str, float], file: str = "metrics.csv") -> None:
        if not self.folder:
            return
        path = self.folder / file
        if file not in self.columns:
            self.columns[file] = list(metrics)
            if path.is_file() and path.stat().st_size:
                with path.open() as f:
                    self.columns[file] = next(csv.reader(f))
            else:
                with path.open("w", newline="") as f:
                    csv.writer(f).writerow(self.columns[file])
        with path.open("a", newline="") as f:
            csv.writer(f).writerow([metrics.get(c, "") for c in self.columns[file]])
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, int(metrics["step"]))

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike, file: str = "metrics.csv") -> list[dict[str, float]]:
    """Rows of metrics.csv (or eval.csv), one per step (the last written wins), in step order.
    `run_dir` may be a URI (s3://...): the file is read through its filesystem."""
    text = _read_text(str(run_dir), file)
    if text is None:
        return []
    rows: dict[int, dict] = {}
    for row in csv.DictReader(text.splitlines()):
        rows[int(row["step"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [rows[s] for s in sorted(rows)]


def best_eval(run_dir: str | os.PathLike, metric: str = "eval/f1") -> dict[str, float] | None:
    """The eval.csv row with the highest `metric` (the one early stopping selects), or None."""
    evals = read_metrics(run_dir, "eval.csv")
    return max(evals, key=lambda r: r.get(metric, -1.0)) if evals else None


def _read_text(folder: str, name: str) -> str | None:
    from ..storage import join_path, read_bytes

    body = read_bytes(join_path(folder, name))
    return body.decode() if body is not None else None


def held_out_summary(evals: list[dict[str, float]], prog: str = "cloze pretrain") -> str:
    """'<prog>: held-out mlm acc 0.001 -> 0.212, ... (step 0 -> 200)' from eval.csv rows."""
    first, last = evals[0], evals[-1]
    parts = [f"{k[len('eval/'):-len('/acc')]} acc {first[k]:.3f} -> {last[k]:.3f}"
             for k in sorted(last) if k.startswith("eval/") and k.endswith("/acc") and k in first]
    parts.append(f"loss {first['eval/loss']:.3f} -> {last['eval/loss']:.3f}")
    return f"{prog}: held-out {', '.join(parts)} (step {first['step']:.0f} -> {last['step']:.0f})"


# ----------------------------------------------------------------------------- memory

def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (views and shared storages once):
    after a step that is the model states (parameters, gradients, optimizer states, ZeRO
    partitions and buffers) plus a batch."""
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr():
                    seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # a tensor subclass without storage
            continue
    return sum(seen.values())


def max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_report(engine, cfg, rank: int, world: int, step: int, device: torch.device) -> dict | None:
    """Every rank's live tensor bytes and peak RSS, mid-step (a collective: every rank calls
    it); the report on rank 0, None elsewhere."""
    tensors = gather_per_rank(live_tensor_bytes(), rank, world, device)
    rss = gather_per_rank(max_rss_bytes(), rank, world, device)
    if rank != 0:
        return None
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return {"measured": f"step {step}, after backward, before the optimizer update", "zero_stage": cfg.zero_stage,
            "precision": cfg.precision, "offload_optimizer": cfg.offload_optimizer, "world_size": world,
            "parameters": params, "live_tensor_bytes": tensors, "max_rss_bytes": rss}
