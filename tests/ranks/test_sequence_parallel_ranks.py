"""scaling.sequence_parallel: 2 (DeepSpeed Ulysses) on two spawned CPU ranks (gloo) trains as one rank
with the whole sequences does (#26 point 3): the same losses, gradient norms, validation, test metrics
and exported model, on ZeRO 2 and 3, with the standard and the chunked objective, and with LoRA; its
checkpoint goes on without sequence parallelism on one rank."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import save_pretrained_llama, tiny_config, tiny_llama
from tests.ranks.spawn import join_group, run_ranks
from trainer import checkpoints, chunked_loss
from trainer.config_load import from_dict
from trainer.loop import WorkerArgs, fine_tune
from trainer.messages import TestResult, TrainReport
from trainer.report import ListReporter

# (ZeRO stage, train.loss_impl, LoRA): chunked under ZeRO-3 gathers the head for a shard's fused loss
# (its count the whole sequence's); LoRA on ZeRO-3 trains adapters of a pretrained model's projections
# (its exported model merged).
CASES = [(2, "standard", False), (3, "standard", False), (3, "chunked", False), (3, "standard", True)]


def _config(tmp: Path, tokenizer_dir, stage: int, impl: str, sp: int, pretrained: Path = None) -> dict:
    # 2 heads and 2 key/value heads: one each per rank. Micro-batch 3 of 96 tokens (48 per rank), labels
    # on the answers only, so the two halves of a sequence hold different label counts.
    model = {"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)} if pretrained is None else \
        {"name_or_path": str(pretrained), "architecture": None, "tokenizer": None}
    lora = {"finetune": {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}} if pretrained else {}
    return tiny_config(tmp, tokenizer_dir, model={**model, "attn_implementation": "sdpa"}, **lora,
                       deepspeed={"zero_stage": stage}, scaling={"workers_per_node": sp, "sequence_parallel": sp},
                       train={"max_steps": 3, "micro_batch_size": 3, "eval_every": 3, "save_every": 3,
                              "log_every": 1, "loss_impl": impl})


def _train(raw: dict, out: Path, resume_from: str = "") -> dict:
    """Train, then (a fresh run) test the final checkpoint and export it, as a launch's workers do."""
    reporter = ListReporter(out / "ckpt")  # both ranks copy their shards in: one whole checkpoint
    args = WorkerArgs(cache_dir=str(out / "cache"), resume_from=resume_from or None, checkpoint_root=str(out / "ckpt"),
                      export_dir=str(out / "export"), test_after=not resume_from)
    fine_tune(from_dict(raw), reporter, args)
    return {"loss": reporter.scalars("train/loss"), "grad_norm": reporter.scalars("train/grad_norm"),
            "validation": [m.validation for m, _ in reporter.calls if isinstance(m, TrainReport)],
            "test": [m.after for m, _ in reporter.calls if isinstance(m, TestResult)]}


def _rank(rank: int, port: int, raws: dict, out: str) -> None:
    """Every case in turn on the same two ranks (one spawn: the start-up is most of the time)."""
    import torch.distributed as dist

    join_group(rank, 2, port)
    chunked_loss.CHUNK_BYTES = 400 * 4 * 20  # several chunks per shard
    for name, raw in raws.items():
        result = _train(raw, Path(out) / name)
        (Path(out) / name / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_ranks_splitting_each_sequence_train_as_one_rank_with_whole_sequences(tmp_path, tokenizer_dir,
                                                                                    process_group, monkeypatch):
    """SP=1 here (this process, world 1) against SP=2 (two ranks, one data-parallel rank): the same
    micro-batches, so per step the same loss and gradient norm (the updates equal: the later steps'
    losses say so too), the same validation, and after training (the test phase and the export run in
    the same processes, as in a launch) the same test metrics and exported weights, within fp32 noise."""
    base = save_pretrained_llama(tmp_path / "pretrained", tokenizer_dir)
    names = {f"zero{stage}-{impl}{'-lora' if lora else ''}": (stage, impl, base if lora else None)
             for stage, impl, lora in CASES}
    split = {name: _config(tmp_path / f"sp2-{name}", tokenizer_dir, stage, impl, 2, pretrained)
             for name, (stage, impl, pretrained) in names.items()}
    for name in split:
        (tmp_path / "sp2" / name).mkdir(parents=True)
    run_ranks(_rank, (split, str(tmp_path / "sp2")))  # a collective out of step would hang: fails after the limit

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 400 * 4 * 20)
    for name, (stage, impl, pretrained) in names.items():
        whole = _train(_config(tmp_path / f"sp1-{name}", tokenizer_dir, stage, impl, 1, pretrained), tmp_path / "sp1" / name)
        ranks = [json.loads((tmp_path / "sp2" / name / f"rank{r}.json").read_text()) for r in range(2)]
        got = ranks[0]  # rank 0 tracks the step's loss (its group's mean) and the norm
        assert len(whole["loss"]) == 3, name
        assert list(got["loss"].values()) == pytest.approx(list(whole["loss"].values()), rel=1e-5, abs=1e-6), name
        assert list(got["grad_norm"].values()) == pytest.approx(list(whole["grad_norm"].values()), rel=1e-4), name
        for rank in ranks:  # validation runs whole sequences, each rank its examples, summed exactly
            for a, b in zip(rank["validation"], whole["validation"], strict=True):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), name
            assert len(rank["test"]) == 1 and rank["test"][0] == pytest.approx(whole["test"][0], rel=1e-5), name
        # the exported models: the same weights
        ours, theirs = (load_file(tmp_path / side / name / "export" / "model.safetensors") for side in ("sp2", "sp1"))
        assert ours.keys() == theirs.keys() and len(ours) > 5
        assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5, name

    # The two ranks' ZeRO-3 checkpoint (partitioned over both, data position in data-parallel terms)
    # goes on here on one rank without sequence parallelism (converted: another world size), as the
    # one-rank run's own checkpoint does: the same next losses.
    longer = _config(tmp_path / "more", tokenizer_dir, 3, "standard", 1)
    longer["train"]["max_steps"] = 5
    went_on = {side: _train({**longer, "output_dir": str(tmp_path / f"more-{side}")}, tmp_path / f"more-{side}",
                            resume_from=str(tmp_path / side / "zero3-standard" / "ckpt" / checkpoints.dir_name(3)))
               for side in ("sp1", "sp2")}
    assert list(went_on["sp2"]["loss"]) == [4, 5]
    assert list(went_on["sp2"]["loss"].values()) == pytest.approx(list(went_on["sp1"]["loss"].values()), rel=1e-5)
