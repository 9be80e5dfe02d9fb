"""The device layer, and the trainer's CUDA control flow run on the CPU through the validating fake CUDA backend.

No GPU here: :class:`lmtune.device.fake_cuda.FakeCuda` stands in for ``torch.cuda`` with torch's own argument checks,
allocator counters of the real tensors' bytes, a real ``torch.OutOfMemoryError`` at its limit, and a record of every
call. Each test runs lmtune's real CUDA branches (``CUDAAccelerator``, ``CudaMemory``) through it. What only a GPU can
run is listed by ``benchmarks/cuda_coverage.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch.cuda._utils import _get_device_index

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.device import CPUAccelerator, CudaMemory, accelerator, accelerators, use_backend
from lmtune.device.fake_cuda import FakeCuda
from lmtune.train import Trainer
from tests.conftest import REPO, TINY

H100 = "NVIDIA H100 80GB HBM3"


def tiny(*extra: str) -> config_lib.Config:
    return config_lib.load(overrides=[*TINY, *extra], locked=False)


@pytest.fixture
def fake():
    """This process's CUDA backend is a fresh fake (2 devices of 80 GiB) for the test."""
    with use_backend(FakeCuda(devices=2, memory_gib=80.0, name=H100)) as backend:
        yield backend


# --- the fake refuses what torch refuses --------------------------------------------------------------


def torch_error(call, *args) -> tuple[type, str]:
    """What torch's own validator raises for ``args`` (the CPU build reaches it before any driver call)."""
    try:
        call(*args)
    except Exception as exc:
        return type(exc), str(exc)
    raise AssertionError("torch accepted it")


def test_the_fake_validates_arguments_with_torchs_own_checks(fake):
    kind, message = torch_error(_get_device_index, torch.device("cuda"))
    with pytest.raises(kind, match=re.escape(message)):
        fake.set_device(torch.device("cuda"))  # the index-less device of the set-up bug
    with pytest.raises(TypeError, match="must be `float`"):
        fake.set_per_process_memory_fraction(1, 0)
    with pytest.raises(ValueError, match="Allowed range: 0~1"):
        fake.set_per_process_memory_fraction(1.5, 0)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        fake.set_device(2)
    with pytest.raises(AssertionError, match="Invalid device id"):
        fake.get_device_properties(5)
    with pytest.raises(ValueError, match="Expected a cuda device"):
        fake.memory_stats(torch.device("cpu"))
    with pytest.raises(TypeError, match="ByteTensor"):
        fake.set_rng_state(torch.zeros(4), 0)
    fake.set_device(torch.device("cuda", 1))
    assert fake.current == 1 and fake.get_device_properties(None).name == H100


def test_cuda_visible_devices_narrows_what_the_fake_shows(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    fake = FakeCuda.from_spec("devices=8,memory_gib=40,name=NVIDIA A100-SXM4-40GB")
    assert fake.device_count() == 1 and fake.physical == ["3"]
    assert fake.get_device_properties(0).total_memory == 40 * 2**30


def test_the_fake_counts_real_bytes_reserves_segments_and_raises_torchs_oom(fake):
    MiB = 2**20
    fake.set_per_process_memory_fraction(8 * MiB / (80 * 2**30), 0)  # an 8 MiB device
    with fake.tracking():
        a = torch.ones(MiB // 4)  # 1 MiB of float32
        assert fake.allocated == MiB and fake.reserved == 2 * MiB
        b = a * 2  # +1 MiB, in the same segment
        assert fake.allocated == 2 * MiB and fake.reserved == 2 * MiB
        view = b[:10]  # a view allocates nothing
        assert fake.allocated == 2 * MiB
        del a
        assert fake.allocated == MiB and fake.reserved == 2 * MiB  # freed to the cache, still reserved
        c = torch.ones(5 * MiB // 4)  # 5 MiB: the pool grows by the 4 MiB it lacks, in 2 MiB segments
        assert fake.reserved == 6 * MiB and fake.peak_allocated == 6 * MiB
        del c
        with pytest.raises(torch.OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate 8\.00 MiB\. GPU 0"):
            torch.ones(2 * MiB)  # 8 MiB more than the 1 MiB in use
        assert fake.ooms == 1 and fake.retries == 1  # the cache was freed and the allocation retried first
        assert fake.reserved == 2 * MiB  # what the retry left: the cache given back
        assert accelerator("cuda").free_memory_gib() * 2**30 == 80 * 2**30 - 2 * MiB  # what the driver has left
        del b, view
    assert fake.allocated == 0
    fake.empty_cache()
    assert fake.reserved == 0 and fake.memory_stats(0)["num_ooms"] == 1


# --- the accelerator --------------------------------------------------------------------------------


def test_the_real_backend_is_torch_cuda_and_its_cpu_runnable_calls_answer_as_on_a_gpu():
    """What of the real backend (TorchCuda) runs without a CUDA runtime: on this CPU build, torch.cuda says no
    device is available, and the calls that need no driver answer as on a GPU."""
    from lmtune.device import TorchCuda

    cuda = TorchCuda()
    assert cuda.is_available() is torch.cuda.is_available() is False  # torch.cuda's own answer, through __getattr__
    assert cuda.tensor_device(1) == torch.device("cuda", 1) and cuda.ddp_device_ids(1) == [1]
    assert cuda.autocast_device_type == "cuda"
    with cuda.tracking():
        cuda.cudagraph_mark_step_begin()  # a new CUDA-graph generation: plain bookkeeping, no driver call


def test_auto_picks_cuda_where_the_backend_has_a_device_and_the_cpu_otherwise(fake, monkeypatch):
    assert accelerator("auto").kind == "cuda" and accelerator("cpu").kind == "cpu"
    with use_backend(FakeCuda(devices=0)):
        assert accelerator("auto").kind == "cpu"
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            accelerator("cuda")
    with pytest.raises(ConfigError, match="CUDA device 5 was asked for, but this process sees 2"):
        accelerator(device="cuda:5")


@pytest.mark.parametrize("variant", ["indexed", "index-less device (the set-up bug)"])
def test_a_single_process_sets_its_device_by_index(fake, monkeypatch, variant):
    """The GPU run's first call: ``set_device`` with an index. The variant with a bare ``torch.device("cuda")`` (what
    resolve_device returned before) must fail exactly as torch fails on a GPU."""
    if variant != "indexed":
        real = accelerators.CUDAAccelerator.__init__

        def bare(self, backend, index=None):
            real(self, backend, index)
            self.index = torch.device("cuda")

        monkeypatch.setattr(accelerators.CUDAAccelerator, "__init__", bare)
        with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
            Trainer(tiny("system.device=cuda", "train.steps=2")).fit()
        return
    Trainer(tiny("system.device=cuda", "train.steps=2")).fit()
    assert fake.called("set_device") == [(0,)]


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_single_process_run_trains_through_every_cuda_branch(fake, device):
    trainer = Trainer(tiny(f"system.device={device}", "train.dtype=bfloat16", "train.steps=12", "train.measure_interval=0"))
    summary = trainer.fit()
    assert summary["status"] == "ok" and summary["device_name"] == H100
    assert summary["memory_model"].startswith("cuda: caching allocator")
    assert summary["device_memory_gib"] == pytest.approx(80.0)
    assert 0 < summary["peak_allocated_gib"] <= summary["peak_reserved_gib"]
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * trainer.throughput.flops_per_token / 989e12)
    assert trainer.optimizer.defaults["fused"] is True
    assert len(fake.called("to_device")) == 2 * 12  # inputs and targets of every micro-batch, pinned
    assert fake.called("set_per_process_memory_fraction") == [(1.0, 0), (1.0, 0)]  # the whole device, then restored
    assert fake.called("cudagraph_mark_step_begin") == []  # compile off: no CUDA graphs to mark


def test_peaks_are_reset_once_warmup_is_over_and_the_refilling_step_is_not_timed(fake):
    trainer = Trainer(tiny("system.device=cuda", "train.steps=10", "train.compile_warmup_steps=3",
                           "train.measure_interval=0", "train.eval_interval=10"))
    trainer.fit()
    names = [name for name, _ in fake.calls if name in ("to_device", "empty_cache", "reset_peak_memory_stats")]
    window = names.index("reset_peak_memory_stats")
    assert names[window - 1] == "empty_cache" and names[:window - 1].count("to_device") == 2 * 3  # after 3 steps
    # 7 steps after warmup, the first of which refills the emptied pool: 6 timed steps
    assert trainer.timer.measured_steps == 6


def test_a_cuda_graph_compile_mode_marks_each_forward_as_a_new_step(fake):
    trainer = Trainer(tiny("system.device=cuda", "train.steps=4", "train.eval_interval=4"))
    trainer.cudagraphs = True  # as for train.compile_mode=reduce-overhead (compiling itself is not the point here)
    trainer.fit()
    evals = -(-trainer.plan.eval_sequences // trainer.cfg.train.micro_batch_size)
    assert len(fake.called("cudagraph_mark_step_begin")) == 4 + evals


def test_an_emulated_limit_is_a_real_cuda_oom_cleaned_up_and_the_fraction_restored(fake):
    peaks = {mb: Trainer(tiny("system.device=cuda", f"train.micro_batch_size={mb}", "train.steps=4",
                              "train.compile_warmup_steps=1")).fit()["peak_reserved_gib"] for mb in (4, 256)}
    limit = (peaks[4] + peaks[256]) / 2
    del fake.calls[:]
    summary = Trainer(tiny("system.device=cuda", "train.micro_batch_size=256", "train.steps=4",
                           "train.compile_warmup_steps=1", f"system.memory_limit_gib={limit}")).fit()
    assert summary["status"] == "oom"
    assert summary["oom_reason"].startswith("CUDA out of memory. Tried to allocate")
    fraction = limit * 2**30 / (80 * 2**30)
    assert fake.called("set_per_process_memory_fraction") == [(pytest.approx(fraction), 0), (1.0, 0)]
    # The cache was emptied after the exception let go of the failed step's activations: what was still allocated
    # then is the model's state, far below the OOM's.
    (allocated_at_cleanup,) = fake.called("empty_cache")[-1]
    assert allocated_at_cleanup < 0.5 * limit * 2**30
    # The next run in this process (a reused trial process) has the whole device again and fits.
    assert Trainer(tiny("system.device=cuda", "train.micro_batch_size=256", "train.steps=2")).fit()["status"] == "ok"


def test_resume_from_a_checkpoint_restores_the_devices_rng_by_index(fake, tmp_path):
    args = ("system.device=cuda", "model.dropout=0.1", "train.steps=20", "train.eval_interval=10")
    full = Trainer(tiny(*args)).fit()
    Trainer(tiny(*args[:-2], "train.steps=10", "train.eval_interval=10"), out_dir=tmp_path).fit()
    state = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert state["rng"]["cuda"].dtype == torch.uint8 and len(state["rng_ranks"]) == 1
    del fake.calls[:]
    resumed = Trainer(tiny(*args), resume_from=tmp_path / "checkpoint").fit()
    assert fake.called("set_rng_state") == [(0,)]
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)


def test_a_checkpoint_from_before_with_every_devices_rng_state_still_resumes(fake, tmp_path):
    Trainer(tiny("system.device=cuda", "train.steps=10"), out_dir=tmp_path).fit()
    path = tmp_path / "checkpoint" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["rng"]["cuda"] = [state["rng"]["cuda"]] * 4  # get_rng_state_all() of a 4-GPU machine
    del state["rng_ranks"]
    torch.save(state, path)
    assert Trainer(tiny("system.device=cuda", "train.steps=12"), resume_from=tmp_path / "checkpoint").fit()["step"] == 12


def test_ddp_gets_the_devices_index_and_gradients_as_bucket_views(fake):
    assert accelerator(device="cuda:1").ddp_kwargs() == {"device_ids": None, "gradient_as_bucket_view": True}
    assert fake.called("ddp_device_ids") == [(1,)]  # validated as the index DDP would be given on a GPU
    assert CPUAccelerator().ddp_kwargs() == {"gradient_as_bucket_view": True}


def test_compiling_on_a_gpu_without_a_c_compiler_or_pythons_headers_is_one_line(fake, monkeypatch, tmp_path):
    from lmtune.config import TrainConfig
    from lmtune.model import GPT
    from lmtune.training.parallelize import apply_compile

    cuda = accelerator("cuda")
    monkeypatch.setattr(accelerators.shutil, "which", lambda name: None)
    monkeypatch.setattr(accelerators.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert cuda.compile_missing() == ("a C compiler (install gcc or set CC) and Python's headers (Python.h; on "
                                      "Debian/Ubuntu: apt install python3-dev) for Triton's kernels")
    with pytest.raises(ConfigError, match=r"^train.compile=true needs a C compiler .* or set train.compile=false\.$"):
        apply_compile(GPT(tiny().model, 256), TrainConfig(compile=True), cuda)
    monkeypatch.setattr(accelerators.shutil, "which", lambda name: f"/usr/bin/{name}")
    (tmp_path / "Python.h").touch()
    assert cuda.compile_missing() is None


def test_the_cpu_accelerator_reports_the_nodes_memory():
    info = CPUAccelerator().info()
    assert info["device_name"] == "cpu" and info["device_memory_gib"] > 0.5
    assert 0 < CPUAccelerator().free_memory_gib() <= info["device_memory_gib"]
    assert Path("/proc/meminfo").is_file()


def test_cuda_memory_window_empties_the_cache_before_the_reset_and_counts_retries_from_its_start(fake):
    meter = CudaMemory(fake, 0)
    fake.retries = 5
    with meter.excluded():  # a measurement before the window: nothing carried, nothing reset
        pass
    assert fake.calls == [] and not meter.probe_due(0) and not meter.over_limit()  # the allocator counts, and limits
    with meter.probe():
        pass
    with fake.tracking():
        warmup = torch.ones(2**20)  # 4 MiB of compile-time scratch, freed before the window
        del warmup
        meter.begin_window(step=3)
        assert [n for n, _ in fake.calls[-3:]] == ["synchronize", "empty_cache", "reset_peak_memory_stats"]
        fake.retries = 7
        steady = torch.ones(2**18)  # 1 MiB
        assert meter.peak() == {"peak_reserved_gib": 2 / 1024, "peak_allocated_gib": 1 / 1024, "alloc_retries": 2.0}
        with meter.excluded():  # a measurement step: its extra buffers are not the steady state
            extra = torch.ones(2**20)
            del extra
        assert [n for n, _ in fake.calls[-3:]] == ["synchronize", "empty_cache", "reset_peak_memory_stats"]
        assert meter.peak()["peak_allocated_gib"] == 1 / 1024  # the measurement's 4 MiB is not carried
        del steady


# --- every CUDA call goes through the device layer --------------------------------------------------


def test_no_module_outside_the_device_layer_calls_torch_cuda():
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "lmtune").rglob("*.py"))
                 if "device" not in p.relative_to(REPO / "lmtune").parts
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"torch\.cuda\.\w+\(", line.split("#")[0]) and "``" not in line]
    assert offenders == []


# --- more than one process ----------------------------------------------------------------------------


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from lmtune.device import cuda_backend

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = tiny("system.device=cuda", "train.steps=10", "model.dropout=0.1", "train.eval_interval=10")
        summary = Trainer(cfg, out_dir=Path(out_dir) / "run" if rank == 0 else None).fit()
        fake = cuda_backend()
        calls = {name: fake.called(name) for name in ("set_device", "ddp_device_ids", "set_per_process_memory_fraction")}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"summary": summary, "calls": calls}, default=str))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_ddp.py: no interpreter teardown under load


@pytest.mark.slow
def test_two_ranks_take_their_devices_from_local_rank(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("LMTUNE_FAKE_CUDA", f"devices=2,memory_gib=80,name={H100}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, out in enumerate(ranks):
        assert out["summary"]["status"] == "ok" and out["summary"]["device_name"] == H100
        assert out["calls"]["set_device"] == [[r]] and out["calls"]["ddp_device_ids"] == [[r]]
    assert ranks[0]["summary"]["loss"] == ranks[1]["summary"]["loss"]  # one all-reduced loss
    state = torch.load(tmp_path / "run" / "checkpoint" / "checkpoint.pt", weights_only=False)
    cpu_states = [s["torch"] for s in state["rng_ranks"]]
    assert len(cpu_states) == 2 and not torch.equal(*cpu_states)  # each rank its own dropout stream
