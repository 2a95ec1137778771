"""Many processes through Lightning's strategies, tested on CPU with the gloo backend.

The multi-process tests start real jobs: ``train.py`` itself, or a *probe* script written into a
temporary folder that is ``train.py`` plus one test callback. The callback records what each rank
trained on, or makes one rank fail or hang. Lightning's launcher re-runs the probe, not
train.py, for rank 1, so both ranks carry the callback; no test hook lives in the package.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from test_training import EMBEDDED, REPO, compose_train, quick
from vit.config import DistributedConfig
from vit.data import build_datamodule
from vit.distributed import build_strategy, devices_per_node, per_device_batch_size
from vit.errors import ConfigError
from vit.inference import load_classifier
from vit.model import Block
from vit.registry import create_model
from vit.training import run

# costly module-scoped fixtures: one worker runs them all, once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_distributed")

JOB_TIMEOUT_S = 120  # a job that takes longer has hung: fail the test instead of waiting

# A small deterministic run: no augmentation, no dropout (vit_mnist has none), float32.
# 256 training digits at a global batch of 64: 4 optimizer steps. SGD rather than AdamW: Adam
# divides by sqrt(v), which turns rounding noise into full-size steps for a parameter whose true
# gradient is zero (the attention's key bias: softmax ignores it), so runs would differ there by
# ~lr although both are right.
SMALL_RUN = (f"data.root={EMBEDDED}", "model=vit_mnist", "model.depth=1", "data.max_train_samples=256",
             "data.global_batch_size=64", "data.augment=false", "trainer.max_epochs=1", "optim=sgd", "optim.lr=0.05",
             "trainer.precision=32-true", "trainer.enable_progress_bar=false", "callbacks.epoch_summary=false")
CPU_DDP = ("trainer=ddp", "trainer.accelerator=cpu")

PROBE = '''\
"""train.py plus a test callback (tests/test_distributed.py); Lightning re-runs this file for rank 1."""
import json, os, sys, time
from pathlib import Path

sys.path.insert(0, {repo!r})
import lightning as L

import vit.training


class Probe(L.Callback):
    """Writes what this rank trained on (PROBE_DIR); fails or hangs on rank PROBE_FAIL_RANK / PROBE_HANG_RANK."""

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler  # the one Lightning put in
        self.record = {{"rank": trainer.global_rank, "world_size": trainer.world_size,
                       "sampler": type(sampler).__name__, "indices": [int(i) for i in sampler],
                       "num_training_batches": trainer.num_training_batches, "batches_run": 0}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1 and trainer.global_rank == int(os.environ.get("PROBE_FAIL_RANK", -1)):
            raise RuntimeError(f"rank {{trainer.global_rank}} fails on purpose")
        if batch_idx == 1 and trainer.global_rank == int(os.environ.get("PROBE_HANG_RANK", -1)):
            time.sleep(600)  # as if stuck: rank 0 waits for this rank's gradients

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["batches_run"] += 1

    def on_train_epoch_end(self, trainer, pl_module):
        if os.environ.get("PROBE_DIR"):
            out = Path(os.environ["PROBE_DIR"]) / f"rank{{trainer.global_rank}}_epoch{{trainer.current_epoch}}.json"
            out.write_text(json.dumps(self.record))


build_trainer = vit.training.build_trainer
build_strategy = vit.training.build_strategy

if os.environ.get("PROBE_FSDP_ON_CPU"):
    # Lightning runs FSDP only on GPUs: its accelerator check refuses the FSDPStrategy class itself,
    # and it gives FSDP no device for a CPU model, which FSDP then refuses. The package's own FSDP
    # strategy (wrapping, sharding, checkpointing as configured) is kept and only those two points
    # are changed, so the same code path trains here over gloo.
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class FSDPOnCPU(FSDPStrategy):
        def _setup_model(self, model):
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy, **self.kwargs)
            return super()._setup_model(model)  # Lightning's own steps for an already wrapped model

    def build_fsdp_strategy_on_cpu(strategy, accelerator, dist):
        configured = build_strategy(strategy, "gpu", dist)
        assert type(configured) is FSDPStrategy, configured
        configured.__class__ = FSDPOnCPU
        return configured

    vit.training.build_strategy = build_fsdp_strategy_on_cpu


def build_trainer_with_probe(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainer.callbacks.append(Probe())
    return trainer


vit.training.build_trainer = build_trainer_with_probe
# Run train.py's code as __main__ (Hydra then finds conf/ beside it), but keep sys.argv[0]: Lightning
# starts rank 1 with it, and rank 1 needs the probe too (runpy.run_path would swap it for train.py).
source = Path({train_py!r})
exec(compile(source.read_text(), str(source), "exec"), {{"__name__": "__main__", "__file__": str(source)}})
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env(**extra: str) -> dict[str, str]:
    # One thread per process: two processes share two busy cores. HYDRA_FULL_ERROR shows a rank's traceback.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        env.pop(key, None)  # a job inside pytest must not believe it is part of an outer one
    return env


def launch(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """A job in its own process group, so that :func:`finish` can end every process it started."""
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=job_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = JOB_TIMEOUT_S) -> tuple[int, str, float]:
    """(exit code, output, seconds until the job's first process exited).

    The output is read until every process of the job has closed it, so a rank left behind
    shows up as a timeout; whatever is left of the job is killed in the end.
    """
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=timeout)
        waited = time.monotonic() - started
    except subprocess.TimeoutExpired:
        waited = time.monotonic() - started
        _kill_group(process)
        output, _ = process.communicate()
        output += f"\n[test: the job's processes were still running after {timeout} s: killed]"
    _kill_group(process)
    return process.returncode, output, waited


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # every process of the job has ended


def write_probe(folder: Path) -> Path:
    path = folder / "probe.py"
    path.write_text(PROBE.format(repo=str(REPO), train_py=str(REPO / "train.py")))
    return path


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def records(probe_dir: Path) -> dict[int, dict]:
    return {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in sorted(probe_dir.glob("rank*_epoch0.json"))}


# -- configuration: fast -----------------------------------------------------------------------------

@pytest.mark.parametrize("trainer, strategy", [("ddp", "ddp"), ("ddp_multinode", "ddp"), ("fsdp", "fsdp")])
def test_trainer_configs_compose(trainer, strategy):
    cfg = compose_train(f"trainer={trainer}", "distributed.timeout_s=30", "compile=true", "data.global_batch_size=256")
    assert cfg.trainer.strategy == strategy and cfg.trainer.accelerator == "gpu"
    assert cfg.distributed.timeout_s == 30 and cfg.compile is True and cfg.data.global_batch_size == 256
    assert cfg.trainer.num_nodes == (2 if trainer == "ddp_multinode" else 1)


def test_ddp_strategy_carries_the_process_group_timeout():
    dist = DistributedConfig(timeout_s=42, find_unused_parameters=True)
    strategy = build_strategy("ddp", "cpu", dist)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._timeout == timedelta(seconds=42)  # what init_process_group receives
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert build_strategy("auto", "cpu", DistributedConfig()) == "auto"  # other names: Lightning's business


def test_fsdp_strategy_wraps_and_optionally_checkpoints_each_block():
    plain = build_strategy("fsdp", "gpu", DistributedConfig())
    assert isinstance(plain, FSDPStrategy) and plain._activation_checkpointing_kwargs == {}
    assert plain.kwargs["auto_wrap_policy"]._module_classes == {Block}
    checkpointed = build_strategy("fsdp", "gpu", DistributedConfig(activation_checkpointing=True,
                                                                   sharding_strategy="SHARD_GRAD_OP"))
    assert checkpointed._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert checkpointed.sharding_strategy.name == "SHARD_GRAD_OP" and checkpointed._timeout == timedelta(seconds=600)


@pytest.mark.parametrize("strategy, accelerator, dist, message", [
    ("ddp", "gpu", {"activation_checkpointing": True}, "activation_checkpointing=true needs trainer.strategy=fsdp"),
    ("fsdp", "cpu", {}, "fsdp needs GPUs"),
    ("fsdp", "gpu", {"sharding_strategy": "EVERYTHING"}, "sharding_strategy must be one of"),
    ("ddp", "cpu", {"timeout_s": 0}, "timeout_s must be positive"),
])
def test_impossible_strategy_settings_are_refused(strategy, accelerator, dist, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(strategy, accelerator, DistributedConfig(**dist))


def test_activation_checkpointing_keeps_checkpoint_keys_and_gradients():
    """What FSDP's activation_checkpointing_policy does to each Block (torch's checkpoint wrapper),
    on CPU: same state-dict keys, same gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    plain = create_model("vit_mnist", depth=2, num_classes=10)
    wrapped = create_model("vit_mnist", depth=2, num_classes=10)
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, auto_wrap_policy=ModuleWrapPolicy({Block}))
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    images = torch.randn(4, 1, 28, 28)
    plain(images).square().sum().backward()
    wrapped(images).square().sum().backward()
    for (name, p), (_, w) in zip(plain.named_parameters(), wrapped.named_parameters()):
        torch.testing.assert_close(w.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


# -- the global batch --------------------------------------------------------------------------------

@pytest.mark.parametrize("global_batch, devices, nodes, accumulate, per_device", [
    (256, 1, 1, 1, 256), (256, 2, 1, 1, 128), (256, 4, 2, 1, 32), (256, 2, 2, 4, 16), (96, 3, 1, 2, 16),
])
def test_global_batch_is_split_over_devices_nodes_and_accumulation(global_batch, devices, nodes, accumulate,
                                                                   per_device):
    assert per_device_batch_size(global_batch, devices, nodes, accumulate) == per_device


@pytest.mark.parametrize("global_batch, devices, nodes, accumulate", [(100, 3, 1, 1), (256, 3, 1, 1), (2, 2, 2, 1)])
def test_global_batch_that_does_not_divide_is_refused(global_batch, devices, nodes, accumulate):
    shares = devices * nodes * accumulate
    with pytest.raises(ConfigError, match=rf"global_batch_size={global_batch} cannot be split .* = {shares} "
                                          rf"batches; choose a multiple of {shares}"):
        per_device_batch_size(global_batch, devices, nodes, accumulate)


@pytest.mark.parametrize("devices, count", [(1, 1), (3, 3), ("2", 2), ("auto", 1)])
def test_devices_are_counted_as_lightning_counts_them(devices, count):
    assert devices_per_node("cpu", devices) == count


def test_a_global_batch_the_devices_cannot_share_stops_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size=100 .* accumulate_grad_batches \(3\) = 3 batches"):
        run(compose_train(*quick(tmp_path, "model=linear_mnist", "data.global_batch_size=100",
                                 "trainer.accumulate_grad_batches=3")))
    with pytest.raises(ConfigError, match="global_batch_size must be a positive integer"):
        run(compose_train(*quick(tmp_path, "model=linear_mnist", "data.global_batch_size=0")))


def test_global_batch_sets_the_per_device_batch_of_a_run(tmp_path):
    results = run(compose_train(*quick(tmp_path, "model=linear_mnist", "data.global_batch_size=64",
                                       "trainer.accumulate_grad_batches=2", "test=false")))
    assert results["batch_size"] == 32  # 64 / (1 device x 1 node x 2 accumulated batches)
    assert results["global_step"] == 256 // 64  # optimizer steps, each over 64 samples


# -- torch.compile ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_compiled_run_writes_checkpoints_an_uncompiled_model_loads(tmp_path):
    results = run(compose_train(*quick(tmp_path, "model=linear_mnist", "compile=true", "trainer.max_steps=2",
                                       "test=false")))
    assert results["global_step"] == 2
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if "_orig_mod" in k]
    module = load_classifier(tmp_path / "checkpoints" / "last.ckpt")  # strict load into a plain, uncompiled model
    assert not isinstance(module.model, torch._dynamo.eval_frame.OptimizedModule)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][key], rtol=0, atol=0, msg=key)


# -- sampler splitting, in memory: fast ----------------------------------------------------------------

def test_distributed_sampler_pads_an_uneven_training_set_to_equal_batch_counts():
    """The loader Lightning makes for rank r of 2: a DistributedSampler over our in-memory dataset
    (``trainer.use_distributed_sampler``). 129 digits at 32 per batch would be 3 batches on one
    rank and 2 on the other (the other rank would then wait forever in the third step); padded to
    130, every rank has 65 samples and 3 batches. The multi-process tests below check the same in
    real jobs."""
    from torch.utils.data import DataLoader, DistributedSampler

    dm = build_datamodule(name="mnist5k", root=EMBEDDED, max_train_samples=129, batch_size=32)
    dm.setup("fit")
    loaders = [DataLoader(dm.train_set, batch_size=32, collate_fn=dm.collate_fn,
                          sampler=DistributedSampler(dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=42))
               for rank in (0, 1)]
    assert [len(loader) for loader in loaders] == [3, 3]
    shares = [list(loader.sampler) for loader in loaders]
    assert [len(share) for share in shares] == [65, 65] and set(shares[0]) | set(shares[1]) == set(range(129))
    assert sum(len(labels) for loader in loaders for _, labels in loader) == 130  # one digit seen twice


# -- real jobs: slow ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference: DDP with one process, so that it samples through a DistributedSampler like the
    2-process job (same seed, same permutation); its batch of 64 is the 2-process job's global batch."""
    work = tmp_path_factory.mktemp("one_process")
    code, output, _ = finish(launch([str(REPO / "train.py"), *CPU_DDP, "trainer.devices=1", *SMALL_RUN, "test=false",
                                     f"hydra.run.dir={work / 'run'}"], cwd=work))
    assert code == 0, output[-4000:]
    return work / "run"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """2 processes on one machine, started by Lightning; Hydra chooses the run directory (under cwd)."""
    work = tmp_path_factory.mktemp("two_processes")
    probe_dir = work / "probe"
    probe_dir.mkdir()
    code, output, _ = finish(launch([str(write_probe(work)), *CPU_DDP, "trainer.devices=2", *SMALL_RUN], cwd=work,
                                    PROBE_DIR=str(probe_dir)))
    assert code == 0, output[-4000:]
    return work, probe_dir, output


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one_given_the_same_global_batch(one_process_run, two_process_run):
    """Rank r of 2 takes permutation[r::2], so its k-th batch of 32 and the other rank's make up
    permutation[64k : 64k + 64], the one process's k-th batch; DDP averages the two ranks' mean
    gradients, which is the mean over those 64. Only the order of float additions differs."""
    work, _, _ = two_process_run
    (two_run,) = (work / "outputs" / "runs").iterdir()
    one, two = model_weights(one_process_run), model_weights(two_run)
    assert one.keys() == two.keys() and len(one) > 10
    for key in one:
        # float32 sums in another order, through 4 SGD steps: differences of ~1e-8 were seen
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    initial = create_model("vit_mnist", depth=1, num_classes=10).state_dict()
    assert not torch.allclose(one["model.head.weight"], initial["head.weight"])  # training did move the weights


@pytest.mark.slow
def test_fsdp_over_two_processes_ends_with_the_weights_of_one(one_process_run, tmp_path):
    """trainer=fsdp as configured by the package (one FSDP unit per Block, FULL_SHARD, full-state
    checkpoints), run on CPU over gloo through the probe (Lightning itself allows FSDP only on
    GPUs). Each rank holds half of every block's parameters and optimizer state; reduce-scattered
    gradients are the mean over the global batch, so the weights match the one-process run's. The
    gathered checkpoint is an ordinary one that loads into an unsharded model.

    With activation checkpointing, so that one job (two processes, ~30 s) covers both: the wrapper
    adds recomputation, not numbers (test_activation_checkpointing_keeps_checkpoint_keys_and_gradients),
    and its names must not reach the checkpoint."""
    probe = write_probe(tmp_path)
    code, output, _ = finish(launch([str(probe), "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                                     *SMALL_RUN, "test=false", "distributed.activation_checkpointing=true",
                                     f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, PROBE_FSDP_ON_CPU="1"))
    assert code == 0, output[-4000:]
    assert "Starting with 2 processes" in output
    one, fsdp = model_weights(one_process_run), model_weights(tmp_path / "run")
    assert one.keys() == fsdp.keys()  # no FSDP or checkpoint-wrapper prefixes in the saved names
    for key in one:
        torch.testing.assert_close(fsdp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    module = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt")
    whole = sum(v.numel() for v in one.values())
    assert sum(p.numel() for p in module.model.parameters()) == whole
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["params"] == whole and results["world_size"] == 2 and results["flops_per_image"] > 0


@pytest.mark.slow
def test_each_rank_trains_on_a_disjoint_equal_share_of_the_training_set(two_process_run):
    _, probe_dir, _ = two_process_run
    ranks = records(probe_dir)
    assert sorted(ranks) == [0, 1]
    for record in ranks.values():
        assert record["sampler"] == "DistributedSampler" and record["world_size"] == 2
        assert len(record["indices"]) == 128 and record["batches_run"] == record["num_training_batches"] == 4
    assert set(ranks[0]["indices"]).isdisjoint(ranks[1]["indices"])
    assert set(ranks[0]["indices"]) | set(ranks[1]["indices"]) == set(range(256))


@pytest.mark.slow
def test_all_ranks_share_one_run_directory_and_only_rank_zero_writes(two_process_run):
    work, _, output = two_process_run
    runs = list((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and not (work / "outputs" / "sweeps").exists()  # no second run directory
    run_dir = runs[0]
    assert "All distributed processes registered. Starting with 2 processes" in output
    assert f"output {run_dir}" in output and output.count(f"output {run_dir}") == 2  # both ranks, one directory
    names = sorted(p.name for p in run_dir.iterdir())
    # Lightning starts rank 1 with hydra.output_subdir=null: one .hydra/, no .pl_hydra_rank_1/, and
    # rank 1's own empty train_ddp_process_1.log is removed (vit.distributed).
    assert [n for n in names if n.startswith(".")] == [".hydra"]
    assert not [n for n in names if "ddp_process" in n or "rank" in n], names
    assert {"results.json", "metrics.csv", "train.log", "confusion_matrix.png", "checkpoints"} <= set(names)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["batch_size"] == 32 and results["global_step"] == 4
    assert results["test_acc"] is not None
    assert len((run_dir / "metrics.csv").read_text().splitlines()[0].split(",")) > 3


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_train_one_job(tmp_path):
    """Two 'machines' of one process each on localhost, started as a multi-node job is: one
    torchrun per node. 129 training digits make the ranks' shares uneven (65 and 64), which
    Lightning's DistributedSampler pads: both ranks run 3 batches, none waits for a missing one."""
    port, run_dir, probe_dir = free_port(), tmp_path / "run", tmp_path / "probe"
    probe_dir.mkdir()
    probe = write_probe(tmp_path)
    jobs = []
    for node_rank in (0, 1):
        args = ["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={port}", str(probe), *CPU_DDP, "trainer.num_nodes=2",
                "trainer.devices=1", *SMALL_RUN, "data.max_train_samples=129", "test=false",
                f"hydra.run.dir={run_dir}"] + (["hydra.output_subdir=null"] if node_rank else [])
        jobs.append(launch(args, cwd=tmp_path, PROBE_DIR=str(probe_dir)))
    finished = [finish(job) for job in jobs]
    for code, output, _ in finished:
        assert code == 0, output[-4000:]
    assert list(tmp_path.rglob("results.json")) == [run_dir / "results.json"]
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2
    ranks = records(probe_dir)
    assert sorted(ranks) == [0, 1]
    assert [ranks[r]["batches_run"] for r in (0, 1)] == [3, 3]
    assert [len(ranks[r]["indices"]) for r in (0, 1)] == [65, 65]
    assert set(ranks[0]["indices"]) | set(ranks[1]["indices"]) == set(range(129))


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job_quickly(tmp_path):
    probe = write_probe(tmp_path)
    code, output, waited = finish(launch([str(probe), *CPU_DDP, "trainer.devices=2", *SMALL_RUN, "test=false",
                                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, PROBE_FAIL_RANK="1"),
                                  timeout=90)
    assert code != 0 and waited < 60, output[-4000:]
    assert "rank 1 fails on purpose" in output
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_the_process_group_timeout(tmp_path):
    """Rank 1 stops answering (it sleeps); rank 0 waits in the gradient all-reduce for
    distributed.timeout_s=5 seconds, not torch's 30 minutes, then fails and stops rank 1."""
    probe = write_probe(tmp_path)
    code, output, waited = finish(launch([str(probe), *CPU_DDP, "trainer.devices=2", *SMALL_RUN, "test=false",
                                          "distributed.timeout_s=5", f"hydra.run.dir={tmp_path / 'run'}"],
                                         cwd=tmp_path, PROBE_HANG_RANK="1"), timeout=90)
    assert code != 0 and waited < 60, output[-4000:]
    assert "5000ms" in output or "timed out" in output.lower(), output[-4000:]


@pytest.mark.slow
def test_ranks_that_disagree_about_the_run_directory_stop_with_a_message(tmp_path):
    """torchrun on two machines without hydra.run.dir: each composes its own (time-stamped)
    directory. Both ranks must stop, saying what to pass, rather than write into two places."""
    port = free_port()
    jobs = [launch(["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
                    "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train.py"), *CPU_DDP,
                    "trainer.num_nodes=2", "trainer.devices=1", *SMALL_RUN, "test=false",
                    f"hydra.run.dir={tmp_path / f'node{node_rank}'}"], cwd=tmp_path)
            for node_rank in (0, 1)]
    for code, output, _ in [finish(job) for job in jobs]:
        assert code != 0 and "write into different run directories" in output and "hydra.run.dir=DIR" in output, \
            output[-4000:]
    assert not list(tmp_path.rglob("*.ckpt"))
