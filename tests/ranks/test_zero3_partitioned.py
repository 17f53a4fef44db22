"""ZeRO-3 builds the model partitioned: two real ranks (gloo, no Ray) run the worker's setup on a
model of ~51M parameters (194 MB in fp32); each rank ends up holding about half of the elements, and
building the model raised a rank's peak memory by about half a copy less than ZeRO-2's build does.

glibc keeps freed memory in its heap once its mmap threshold has adapted upwards, so zero.Init's
allocate-then-partition churn would show up as retained RSS rather than live memory: the ranks run
with a fixed MALLOC_MMAP_THRESHOLD_ (large blocks are mapped and unmapped), which makes peak RSS
measure what was really held."""
import gc
import json
import os
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from tests.ranks.spawn import join_group, run_ranks

FULL = {"model_type": "llama", "num_hidden_layers": 12, "hidden_size": 512, "intermediate_size": 2048,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 400, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _status_kb(key: str) -> int:
    """A /proc/self/status figure in kB (VmHWM: this process's peak RSS; ru_maxrss would carry the
    parent's peak across exec)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1])


def _rank(rank: int, port: int, raws: dict, out: str) -> None:
    """Both builds on each rank, ZeRO-3's first: in a fresh process, as in a worker. ZeRO-2's comes after
    the ZeRO-3 engine is released; with large blocks mapped and unmapped, what ZeRO-3's build freed went
    back to the OS, so ZeRO-2's build peak (measured from the current RSS) is its own full copy."""
    join_group(rank, 2, port)  # DS_ACCELERATOR=cpu set before deepspeed is imported
    import deepspeed  # noqa: F401  (imported before measuring, as in a worker)
    import torch.distributed as dist

    from trainer import worker
    from trainer.config_load import from_dict
    from trainer.engine import release_engine
    from trainer.jobs import WorkerArgs
    from trainer.report import ListReporter

    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=16))  # import and warm up the model code before measuring
    real_build, seen = worker.build_model, {}

    def measured_build(*args, **kwargs):  # the real build, with the peak memory it added
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
        before = _status_kb("VmRSS")
        model = real_build(*args, **kwargs)
        seen["build_peak_mb"] = (_status_kb("VmHWM") - before) / 1024
        return model

    worker.build_model = measured_build
    for stage in (3, 2):
        s = worker.setup(from_dict(raws[stage]), WorkerArgs(cache_dir=os.path.join(out, "cache")), ("validation",),
                         ListReporter())
        params = list(s.engine.module.parameters())
        seen["local"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        seen["total"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        with open(os.path.join(out, f"stage{stage}_rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        release_engine(s.engine)
        del s, params
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


def _setup_on_two_ranks(tmp_path, tokenizer_dir) -> dict[int, list[dict]]:
    """ZeRO-3's and ZeRO-2's setup on the same two spawned ranks (one spawn: the ranks' start-up, the
    imports above all, is most of its cost)."""
    raws = {stage: tiny_config(tmp_path, tokenizer_dir, model={"architecture": FULL, "tokenizer": str(tokenizer_dir)},
                               deepspeed={"zero_stage": stage}) for stage in (3, 2)}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the spawned ranks start
    try:
        run_ranks(_rank, (raws, str(tmp_path)))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return {stage: [json.loads((tmp_path / f"stage{stage}_rank{r}.json").read_text()) for r in range(2)]
            for stage in (3, 2)}


def test_zero3_builds_the_model_partitioned_and_never_holds_a_full_copy(tmp_path, tokenizer_dir):
    built = _setup_on_two_ranks(tmp_path, tokenizer_dir)
    zero3, zero2 = built[3], built[2]
    total = zero3[0]["total"]
    full_mb = total * 4 / 2**20  # fp32
    assert full_mb > 150
    for rank in zero2:  # building without partitioning: every rank holds everything
        assert rank["local"] == total and rank["build_peak_mb"] > 0.9 * full_mb, rank
    for three, two in zip(zero3, zero2):
        assert three["total"] == total
        assert three["local"] == pytest.approx(total / 2, rel=0.02)  # about half of the elements each
        # the build never held the whole model: its peak is about half a copy below ZeRO-2's
        assert three["build_peak_mb"] < two["build_peak_mb"] - 0.35 * full_mb, (three, two)
