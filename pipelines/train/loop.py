"""The worker loop of every task: DeepSpeed engine, this rank's batches, steps, metrics,
held-out evaluation, checkpoints, exact resume, export. Knows nothing of what is learned.

`train_loop_per_worker(config)` runs in each Ray Train worker; config = {"task": Task,
"deepspeed": dict, "run": {run_dir, metrics_dir, sync_dir, export_dir, resume_from,
torch_extensions_dir, cpu_peak_flops}, "callbacks": [Callback, ...]}.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data.loader import mix_seed
from .checkpoint import checkpoint_problem, checkpoint_step, load_checkpoint, save_checkpoint
from .metrics import DeviceSums, MetricsWriter, gpu_peak_flops, max_rss_bytes, memory_report
from .optim import build_engine
from .task import Task

DROPOUT = 0xD12  # seed stream of each rank's dropout / sampling RNG


def evaluate(engine, batches: list[dict], world: int, device) -> dict[str, float]:
    """Held-out metrics over fixed batches (every rank its own slice, the same count):
    eval/loss averaged over batches, eval/<part>/{loss,acc} over labelled positions."""
    sums = DeviceSums(device)
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            m = engine({k: v.to(device) for k, v in batch.items()}).metrics
            sums.add({"loss": m["loss"], "batches": 1.0})
            for key, count in m.items():
                if key.endswith("/count"):
                    part = key[: -len("/count")]
                    sums.add({f"{part}/loss": m[f"{part}/loss"], f"{part}/acc": m[f"{part}/acc"]}, weight=count)
                    sums.add({key: count})
    engine.train()
    total = sums.reduce(world)
    out = {"eval/loss": total["loss"] / max(total["batches"], 1.0)}
    for key in total:
        if key.endswith("/count"):
            part = key[: -len("/count")]
            for what in ("loss", "acc"):
                out[f"eval/{part}/{what}"] = total[f"{part}/{what}"] / max(total[key], 1.0)
    return out


def full_state(engine, cfg, rank: int) -> dict[str, torch.Tensor] | None:
    """The consolidated fp32 state dict on rank 0 (a collective under ZeRO-3 and bf16: every
    rank calls it); bf16 runs export the optimizer's fp32 master weights, not their copies."""
    import deepspeed

    master: dict[str, torch.Tensor] = {}
    if cfg.precision == "bf16":
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None:
                master[name] = full.detach().to("cpu", torch.float32).clone()
    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else nullcontext()
    state = None
    with gather:
        if rank == 0:
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
            tied = {id(v): k for k, v in engine.module.named_parameters()}  # state_dict lists tied weights twice
            for k, v in engine.module.state_dict(keep_vars=True).items():
                if tied.get(id(v)) in master:
                    state[k] = master[tied[id(v)]]
    return state


def _publish_best(best_dir: str, export_dir: str) -> None:
    """best/ -> model/: a rename locally, a copy on an object store."""
    if "://" not in export_dir:
        import shutil

        if Path(export_dir).exists():
            shutil.rmtree(export_dir)
        shutil.copytree(best_dir, export_dir)
        return
    import pyarrow.fs as pafs

    pafs.copy_files(best_dir, export_dir)


def _local(checkpoint: str | None):
    """A checkpoint folder as a local directory (a URI's is downloaded), or None."""
    if not checkpoint or "://" not in checkpoint:
        return nullcontext(checkpoint)
    import ray.train

    from ..storage import filesystem

    fs, path = filesystem(checkpoint)
    return ray.train.Checkpoint(path=path, filesystem=fs).as_directory()


def train_loop_per_worker(config: dict) -> None:
    run = config["run"]
    os.environ["TORCH_EXTENSIONS_DIR"] = run["torch_extensions_dir"]  # before DeepSpeed builds an op
    import ray.train
    import ray.train.torch

    task: Task = config["task"]
    callbacks = config.get("callbacks") or []
    cfg = task.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if run.get("sync_dir") and rank == 0:  # remote storage: rank 0 stages its files on its own node
        from ..storage import join_path, read_bytes

        run = {**run, "metrics_dir": tempfile.mkdtemp(prefix="cloze-metrics-")}
        for name in ("metrics.csv", "eval.csv"):  # a restarted worker continues the files it had synced
            body = read_bytes(join_path(run["sync_dir"], name))
            if body is not None:
                (Path(run["metrics_dir"]) / name).write_bytes(body)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = task.build_model()
    engine, schedule = build_engine(model, task.param_groups(model), cfg, config["deepspeed"])
    if world == 1 and cfg.zero_stage == 0:
        # one worker, no ZeRO partitions: DeepSpeed's gradient all-reduce would flatten every
        # gradient into a buffer, reduce it with itself and copy it back (identical values;
        # 4-6% of a MiniLM fine-tuning step's CPU time). ZeRO 1-3 keep theirs: they partition.
        # One difference: that path also gives a parameter no objective uses (BERT's pooler
        # under MLM + SOP) a zero gradient, which AdamW then decays; without it, such a
        # parameter keeps no gradient and AdamW leaves it alone, as in plain PyTorch.
        engine.enable_backward_allreduce = False
    torch.manual_seed(mix_seed(cfg.seed, DROPOUT, rank))  # each rank its own dropout masks

    state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "samples": 0, "metrics": {}}
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else nullcontext()) as ray_dir, _local(run.get("resume_from")) as picked:
        candidates = []
        for path in (ray_dir, picked):
            problem = checkpoint_problem(path) if path else None
            if path and problem is None:
                candidates.append((checkpoint_step(path), path))
            elif path and rank == 0:
                print(f"cloze: skipping checkpoint {path}: {problem}")
        if candidates:
            state = {"metrics": {}, **load_checkpoint(engine, max(candidates)[1], rank)}

    batches = task.batches(rank, world, state["epoch"], state["index"])
    peak = run.get("cpu_peak_flops") or 0.0
    if cfg.use_gpu and torch.cuda.is_available():
        peak = gpu_peak_flops(torch.cuda.get_device_name(device), cfg.precision)
    writer = MetricsWriter(run.get("metrics_dir") if rank == 0 else None)
    held_out = task.held_out(rank, world)
    step, tokens_seen, samples_seen = state["step"], state["tokens"], state["samples"]
    start_step, epoch, index = step, state["epoch"], state["index"]
    metrics: dict[str, float] = dict(state["metrics"])  # a resumed finished run exports what it had
    stop = False

    best = dict(state.get("best") or {})  # {"value", "step", "bad"}: model selection on select_metric

    def held_out_eval(at_step: int) -> dict[str, float]:
        result = task.evaluate(engine, rank, world, device)
        if result is None:
            result = evaluate(engine, held_out, world, device) if held_out else {}
        if not result:
            return {}
        writer.write({"step": at_step, **result, "time": time.time()}, file="eval.csv")
        if cfg.select_metric:
            select(at_step, result)
        return result

    def select(at_step: int, result: dict[str, float]) -> None:
        """Keep the best evaluation's weights as `best/` (exported now: a restart keeps it)."""
        if cfg.select_metric not in result:
            raise KeyError(f"select_metric {cfg.select_metric!r} is not among the evaluation's metrics "
                           f"({', '.join(sorted(result))})")
        value = result[cfg.select_metric]
        lower = cfg.select_metric.endswith("loss")
        if not best or (value < best["value"] if lower else value > best["value"]):
            best.update(value=value, step=at_step, bad=0)
            weights = full_state(engine, cfg, rank)  # a collective under ZeRO-3
            if rank == 0 and run.get("best_dir"):
                task.export(weights, {"step": at_step, **result, "selected_by": cfg.select_metric},
                            run["best_dir"])
        else:
            best["bad"] = best.get("bad", 0) + 1

    def sync() -> None:  # run artifacts to shared storage (rank 0), at checkpoints and the end
        writer.flush()
        if rank == 0 and run.get("sync_dir"):
            import pyarrow.fs as pafs

            pafs.copy_files(run["metrics_dir"], run["sync_dir"])

    def agree(flag: bool) -> bool:  # a decision every rank takes together (else collectives diverge)
        vec = torch.tensor([float(flag)], device=device)
        if world > 1:
            torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX)
        return bool(vec.item())

    if step == 0:
        held_out_eval(0)  # the starting point the final evaluation is compared with
    sums = DeviceSums(device)
    host = {"tokens": 0.0, "samples": 0.0, "flops": 0.0, "steps": 0}
    interval_start = time.perf_counter()  # wall clock of the steps since the last metric row
    engine.train()
    finished = bool(state.get("early_stopped"))  # a resumed run that had stopped early trains no more
    while step < cfg.max_steps and not (cfg.max_tokens and tokens_seen >= cfg.max_tokens) and not finished:
        lr = schedule.get_last_lr()[0]
        stop = agree(any(cb.wants_stop(step + 1) for cb in callbacks)) if callbacks else False
        checkpoint_now = bool(cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
        # a token budget needs every step's global token count (one small all-reduce per step);
        # a checkpoint or a stop records exact counters
        log_now = (cfg.max_tokens > 0 or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
                   or checkpoint_now or stop)
        stage0_norm = None
        for _ in range(cfg.accumulation):
            epoch, index, batch = next(batches)
            for cb in callbacks:
                cb.on_batch(step + 1, rank, batch)
            n, samples = task.sizes(batch)  # host numbers from the CPU batch: no device sync
            host["tokens"] += n
            host["samples"] += samples
            host["flops"] += task.flops(batch)
            out = engine({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            engine.backward(out.loss)
            sums.add({k: v for k, v in out.metrics.items() if not k.endswith("/count")},
                     weight=1.0 / cfg.accumulation)
            if cfg.zero_stage == 0 and log_now and engine.is_gradient_accumulation_boundary():
                # DeepSpeed computes no norm for an fp32 ZeRO-0 step; grads are whole (and averaged) here
                grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                stage0_norm = torch.stack(grads).norm() if grads else torch.zeros(())
            if step == start_step + 1 and engine.is_gradient_accumulation_boundary():
                # this worker's 2nd step, before the update: gradients are alive and the optimizer
                # states exist (they appear at the first update), so model states are all allocated
                report = memory_report(engine, cfg, rank, world, step + 1, device)
                if report is not None and run.get("metrics_dir"):
                    (Path(run["metrics_dir"]) / "memory.json").write_text(json.dumps(report, indent=2))
            engine.step()  # DeepSpeed steps the optimizer and lr schedule at the accumulation boundary
        step += 1
        host["steps"] += 1
        if log_now:
            sums.add({"_tokens": host["tokens"], "_samples": host["samples"], "_flops": host["flops"]})
            total = sums.reduce(world)  # waits for the device: the interval's time is complete after it
            dt = time.perf_counter() - interval_start
            grad_norm = stage0_norm if cfg.zero_stage == 0 else engine.get_global_grad_norm()
            metrics = {"step": step, **{k: v / (world * host["steps"]) for k, v in total.items()
                                        if not k.startswith("_")},
                       "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "tokens_per_s": total["_tokens"] / dt, "samples_per_s": total["_samples"] / dt,
                       "mfu": total["_flops"] / dt / (peak * world) if peak else 0.0,
                       "epoch": epoch, "batch_index": index, "step_time_s": dt / host["steps"],
                       "max_rss_mb": max_rss_bytes() / 2**20, "time": time.time()}
            tokens_seen += int(total["_tokens"])
            samples_seen += int(total["_samples"])
            metrics.update(tokens=tokens_seen, samples=samples_seen)
            writer.write(metrics)
            host = {"tokens": 0.0, "samples": 0.0, "flops": 0.0, "steps": 0}
        done = step >= cfg.max_steps or (cfg.max_tokens and tokens_seen >= cfg.max_tokens)
        if done or stop or checkpoint_now:
            metrics.update(held_out_eval(step))
            early = bool(cfg.patience and best.get("bad", 0) >= cfg.patience)
            if early:
                done = True  # early stop: every rank saw the same (all-reduced) evaluation
                metrics["early_stopped"] = 1.0
            state = {"step": step, "epoch": epoch, "index": index + 1, "tokens": tokens_seen,
                     "samples": samples_seen, "world_size": world, "metrics": metrics, "best": best,
                     "early_stopped": early}
            sync()  # before the checkpoint counts: a restart never lacks the rows before it
            with tempfile.TemporaryDirectory(prefix="cloze-ckpt-") as tmp:
                save_checkpoint(engine, Path(tmp), state, rank, task.locate(rank, world, epoch, index + 1))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{step:08d}")
        elif cfg.report_every and step % cfg.report_every == 0:
            ray.train.report(metrics)
        for cb in callbacks:
            cb.after_step(step, rank, world, run.get("metrics_dir") or "")
        if log_now:
            interval_start = time.perf_counter()  # evaluation and checkpoints are not step time
        if stop or done:
            break
    close = getattr(batches, "close", None)
    if close is not None:
        close()  # the loader thread stops before the worker moves on
    if stop:
        writer.close()
        return
    if cfg.select_metric and best and run.get("best_dir"):
        if rank == 0 and run.get("export_dir"):  # the selected weights become the model
            from ..storage import join_path, read_bytes

            if read_bytes(join_path(run["best_dir"], "cloze.json")) is not None:
                _publish_best(run["best_dir"], run["export_dir"])
    else:
        weights = full_state(engine, cfg, rank)
        if rank == 0 and run.get("export_dir"):
            task.export(weights, metrics, run["export_dir"])
    writer.close()
    sync()
