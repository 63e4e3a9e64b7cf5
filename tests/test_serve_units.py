"""`cloze serve` without Ray: settings refused before anything starts (exit 2, one line), the
token-budget batch cost, and the FIFO requeue that keeps arrival order when Ray Serve defers
the text that overflowed a batch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from encoder import ConfigError


def test_serve_config_rejects_what_ray_serve_would_accept_silently(tmp_path):
    from pipelines.serve_config import ServeConfig

    assert ServeConfig().host == "127.0.0.1"  # loopback unless told otherwise
    with pytest.raises(ConfigError, match="max_ongoing_requests .8. < serve.max_batch_size .32."):
        ServeConfig(max_ongoing_requests=8)
    ServeConfig(max_ongoing_requests=8, batching="none")  # no batch to fill
    with pytest.raises(ConfigError, match="serve.max_queued_requests must be >= 1"):
        ServeConfig(max_queued_requests=-1)  # Ray's "unbounded"
    with pytest.raises(ConfigError, match="serve.max_replicas must be >= min_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="serve.batching must be one of tokens, count, none"):
        ServeConfig(batching="dynamic")
    with pytest.raises(ConfigError, match="serve.quantize"):
        ServeConfig(quantize="int4")
    with pytest.raises(ConfigError, match="serve.dtype fp16 needs a GPU"):
        ServeConfig(dtype="fp16")  # CPU replicas
    with pytest.raises(ConfigError, match="serve.quantize int8 is for fp32 CPU inference"):
        ServeConfig(quantize="int8", num_gpus=1)
    with pytest.raises(ConfigError, match="serve.dtype must be one of fp32, bf16, fp16"):
        ServeConfig(dtype="float8")
    gpu = ServeConfig(num_gpus=0.5, dtype="fp16")
    assert (gpu.device, gpu.actor_options) == ("cuda", {"num_cpus": 1.0, "num_gpus": 0.5})
    assert (ServeConfig().device, ServeConfig().actor_options) == ("cpu", {"num_cpus": 1.0})
    with pytest.raises(ConfigError, match="max_batch_tokens .64. < the model's max_seq_len .128."):
        ServeConfig(max_batch_tokens=64).check_model(128)
    toml = tmp_path / "serve.toml"
    toml.write_text("[serve]\nport = 9001\nbatching = \"count\"\n")
    cfg = ServeConfig.from_toml(toml, {"serve.max_batch_size": 16})
    assert (cfg.port, cfg.batching, cfg.max_batch_size, cfg.autoscaling) == (9001, "count", 16, False)
    assert ServeConfig(num_cpus=0.5).threads == 1 and ServeConfig(num_cpus=2).threads == 2
    with pytest.raises(ConfigError, match="unknown config key serve.colour"):
        ServeConfig.from_toml(None, {"serve.colour": "red"})
    with pytest.raises(ConfigError, match="pretrain.lr: `cloze serve` reads only the .serve. table"):
        ServeConfig.from_toml(None, {"pretrain.lr": 1.0})
    with pytest.raises(ConfigError, match="serve.port: expected an integer"):
        ServeConfig.from_toml(None, {"serve.port": "eighty"})
    sample = ServeConfig.from_toml(Path(__file__).parent.parent / "configs" / "serve.toml")
    assert (sample.batching, sample.num_cpus, sample.threads) == ("tokens", 2.0, 2)


@pytest.mark.parametrize("argv, message", [
    (["serve", "/nonexistent/model"], "not a classifier folder"),
    (["serve", "MODEL", "--serve.max_ongoing_requests", "4"], "max_ongoing_requests (4) < serve.max_batch_size"),
    (["serve", "MODEL", "--serve.nope", "1"], "unknown config key serve.nope"),
    (["serve"], "MODEL_DIR is required"),
    (["serve", "MODEL", "--model", "MODEL"], "give MODEL_DIR to start serving, or --model"),
    (["serve", "--model", "MODEL", "--port", "1"], "no `cloze serve` found on port 1"),
])
def test_cli_refuses_bad_input_before_ray_with_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    import ray

    from pipelines.cli import main
    from test_serve_inference import tiny_classifier

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for bad input"))
    model = tiny_classifier(tmp_path / "m") if "MODEL" in argv else ""
    assert main([model if a == "MODEL" else a for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloze serve: error: ") and message in lines[0], lines


def test_the_console_script_exits_2_on_a_bad_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a classifier folder" in out.stderr


def test_token_budget_cost_caps_tokens_and_texts():
    from pipelines.serve_batching import Item, batch_cost

    cost = batch_cost(max_batch_tokens=100, max_batch_size=4)
    items = [Item("logits", None, n, 0.0) for n in (10, 20, 30, 40, 50)]
    assert cost(items[:1]) == 25  # one text costs at least its share (100 / 4) of the budget
    assert cost(items[:3]) == 75 and cost(items[2:4]) == 70  # real tokens when they dominate
    assert cost(items[:4]) == 100  # full at exactly the budget: accepted
    assert cost(items) > 100  # 150 tokens: over
    assert cost([Item("logits", None, 1, 0.0)] * 5) > 100  # 5 tiny texts: over by count


def run_ray_batcher(adapt: bool, tokens: list[int], forward_s: float = 0.03, every_s: float = 0.002):
    """Ray Serve 2.60's own @serve.batch (token budget 100, 1 ms wait) on an event loop outside
    Ray (only its replica-context warning is bypassed): texts of `tokens` arrive every
    `every_s`; each forward pass takes `forward_s`. Returns the batches as arrival indices."""
    import ray.serve.batching as ray_batching
    from ray import serve

    from pipelines.serve_batching import Item, adapt_batch_queue, batch_cost

    batches = []

    async def forward(items):
        batches.append([int(i.enqueued) for i in items])
        await asyncio.sleep(forward_s)
        return [i.tokens for i in items]

    async def main():
        batched = serve.batch(max_batch_size=100, batch_wait_timeout_s=0.001,
                              batch_size_fn=batch_cost(100, 100))(forward)
        if adapt:
            adapt_batch_queue(batched)

        async def one(k, n):
            await asyncio.sleep(k * every_s)
            return await batched(Item("logits", None, n, float(k)))
        assert await asyncio.gather(*(one(k, n) for k, n in enumerate(tokens))) == tokens

    warn = ray_batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests
    ray_batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    try:
        asyncio.run(main())
    finally:
        ray_batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = warn
    return batches


def test_batches_take_what_arrived_during_the_previous_forward_pass():
    plain = run_ray_batcher(False, [10] * 60)
    ours = run_ray_batcher(True, [10] * 60)
    # Ray alone: a batch per 1 ms wait window, queued behind the running forward pass
    assert len(plain) >= 1.5 * len(ours), (plain, ours)
    assert len(ours) <= 8 and max(len(b) for b in ours) == 10  # 6 full budgets (10 x 10 tokens) + stragglers
    assert sorted(i for b in ours for i in b) == list(range(60))


def test_a_text_that_overflows_the_budget_keeps_its_place():
    tokens = [10] * 5 + [95] + [10] * 20  # text 5 cannot join the batch that is filling
    plain = run_ray_batcher(False, tokens, every_s=0.0)
    ours = run_ray_batcher(True, tokens, every_s=0.0)
    order = [i for b in ours for i in b]
    assert order == list(range(len(tokens))), ours  # arrival order, batch after batch
    assert [i for b in plain for i in b] != list(range(len(tokens)))  # Ray alone sends text 5 to the back


def test_the_serve_application_carries_the_settings(tmp_path, monkeypatch):
    """What Ray Serve is asked for (no Ray needed to build it): queue bounds, 429 with
    Retry-After, CPUs, autoscaling; and the `serve run` / RayService builder."""
    from pipelines.serve import app_builder, application
    from pipelines.serve_config import ServeConfig
    from pipelines.serve_http import token_digest
    from test_serve_inference import tiny_classifier

    folder = tiny_classifier(tmp_path / "m")
    cfg = ServeConfig(min_replicas=1, max_replicas=3, upscale_delay_s=2, num_cpus=0.5, max_queued_requests=7)
    d = application(folder, cfg, None)._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert (d.max_ongoing_requests, d.max_queued_requests, d.ray_actor_options["num_cpus"]) == (64, 7, 0.5)
    assert (auto.min_replicas, auto.max_replicas, auto.upscale_delay_s) == (1, 3, 2)
    assert d._deployment_config.backpressure_config.status_code == 429
    assert application(folder, ServeConfig(min_replicas=2, max_replicas=2), None)._bound_deployment.num_replicas == 2
    on_gpus = application(folder, ServeConfig(num_gpus=1, dtype="bf16"), None)._bound_deployment
    assert on_gpus.ray_actor_options["num_gpus"] == 1 and on_gpus.init_args[1]["dtype"] == "bf16"
    monkeypatch.setenv("CLOZE_API_TOKEN", "s3cret")
    built = app_builder({"model_dir": folder, "batching": "count", "max_batch_size": 8})._bound_deployment
    assert built.init_args[0] == folder and built.init_args[1]["batching"] == "count"
    assert built.init_args[2] == token_digest("s3cret") and "s3cret" not in repr(built.init_args)
    with pytest.raises(ConfigError, match="unknown config key serve.bogus"):
        app_builder({"model_dir": folder, "bogus": 1})


def test_a_port_in_use_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    import socket

    import ray

    from pipelines.cli import main
    from test_serve_inference import tiny_classifier

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for a busy port"))
    folder = tiny_classifier(tmp_path / "m")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", folder, "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
