"""The streamed export (#27) of a two-rank ZeRO-3 checkpoint: bit for bit what the export by a whole
model (build, fill, save_pretrained) writes, loadable with from_pretrained, giving the test loss; for a
lean (local-mode) checkpoint too, whose frozen weights come from the base model's files; in bf16; and
in several shards with an index."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import save_pretrained_llama, tiny_config
from tests.ranks.spawn import join_group, run_ranks
from trainer.config_load import from_dict, to_dict
from trainer.loop import WorkerArgs, run, run_test
from trainer.report import ListReporter


def _cfg(tmp: Path, tokenizer_dir, mode: str):
    # Tied embeddings (SmolLM2's layout): lm_head.weight is embed_tokens.weight, written once.
    base = save_pretrained_llama(tmp / "pretrained", tokenizer_dir, tied=True)
    finetune = {"mode": mode, **({"train": ["model.layers.1.*"]} if mode == "local" else {})}
    return from_dict(tiny_config(tmp, tokenizer_dir, model={"name_or_path": str(base), "architecture": None,
                                                            "tokenizer": None},
                                 finetune=finetune, optim={"lr": 1e-2}, deepspeed={"zero_stage": 3},
                                 train={"max_steps": 2, "eval_every": 2, "save_every": 2, "micro_batch_size": 4}))


def _train_test_export(rank: int, port: int, jobs: list) -> None:
    """Each job (a config as plain data, its folder) in turn on the same two ranks: train, test, export."""
    import torch.distributed as dist

    join_group(rank, 2, port)
    for raw, out in jobs:
        cfg, root = from_dict(raw), Path(out)
        trained = ListReporter(root / "ckpt")
        run(cfg, trained, WorkerArgs(cache_dir=str(root / "cache")))
        checkpoint = str(trained.calls[-1][1])
        tester = ListReporter()
        result = run_test(cfg, tester, WorkerArgs(cache_dir=str(root / "cache"), final_checkpoint=checkpoint,
                                                  export_dir=str(root / "final_model")))
        dist.barrier()
        if rank == 0:
            (root / "tested.json").write_text(json.dumps({"loss": result.after["loss"], "checkpoint": checkpoint,
                                                          "lines": tester.lines}))
    os._exit(0)  # the files are on disk; the native teardown is not what this test is about


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, tokenizer_dir) -> dict:
    """The global and the local (lean) run on one spawn of two ranks, global first in the fresh processes
    (a spawn's cost is mostly the ranks' start-up): mode -> (config, its folder, what rank 0 tested)."""
    tmps = {mode: tmp_path_factory.mktemp(f"export_{mode}") for mode in ("global", "local")}
    cfgs = {mode: _cfg(tmp, tokenizer_dir, mode) for mode, tmp in tmps.items()}
    run_ranks(_train_test_export, ([(to_dict(cfgs[mode]), str(tmp)) for mode, tmp in tmps.items()],))
    return {mode: (cfgs[mode], tmp, json.loads((tmp / "tested.json").read_text())) for mode, tmp in tmps.items()}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _test_loss(cfg, folder: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import data_cache
    from trainer.evaluation import Shard
    from trainer.tasks import causal_lm

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    test = data_cache.prepare(cfg, tokenizer, None).splits["test"]
    shard = Shard(lambda b: model(**b).logits, causal_lm.collator(tokenizer), 0, 1, 8, "cpu")
    return causal_lm.evaluate(shard, test, [])[0]["loss"]


def _same_as_built(cfg, tmp: Path, tested: dict, dtype: str) -> None:
    from trainer.export import export_built, export_model

    checkpoint, streamed = Path(tested["checkpoint"]), tmp / f"streamed_{dtype}"
    assert export_model(cfg, checkpoint, streamed, _tokenizer(tmp), [], str(tmp / "cache"), dtype) == "streamed"
    if dtype == "fp32":  # what rank 0 of the test phase wrote
        assert _tensors(tmp / "final_model").keys() == _tensors(streamed).keys()
        assert all(torch.equal(a, _tensors(streamed)[k]) for k, a in _tensors(tmp / "final_model").items())
    built = tmp / f"built_{dtype}"
    export_built(cfg, checkpoint, built, _tokenizer(tmp), [], str(tmp / "cache"), dtype)
    ours, theirs = _tensors(streamed), _tensors(built)
    assert sorted(ours) == sorted(theirs) and "lm_head.weight" not in ours  # the tied weight written once
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
        assert torch.equal(ours[name], theirs[name]), name
    config = json.loads((streamed / "config.json").read_text())
    assert config["dtype"] == json.loads((built / "config.json").read_text())["dtype"]
    assert config["tie_word_embeddings"] and (streamed / "generation_config.json").is_file()
    if dtype == "fp32":
        # The test phase read each rank's own shard of the masters (no consolidation per rank, #27), and
        # its loss is the exported model's (which zero_to_fp32 consolidated from every shard).
        assert any("loaded (each rank its own shard)" in line for line in tested["lines"]), tested["lines"]
        assert _test_loss(cfg, tmp / "final_model") == pytest.approx(tested["loss"], rel=1e-5)


def _tokenizer(tmp: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tmp / "pretrained")


def test_streamed_export_of_a_zero3_checkpoint_is_the_built_one_bit_for_bit(spawned, process_group):
    from trainer.export import saved_names, write_safetensors

    cfg, tmp_path, tested = spawned["global"]
    _same_as_built(cfg, tmp_path, tested, "fp32")
    _same_as_built(cfg, tmp_path, tested, "bf16")  # streamed as bf16, never the fp32 model first

    # Several shards and their index, as save_pretrained names them; from_pretrained reads them.
    whole = _tensors(tmp_path / "final_model")
    sharded = tmp_path / "sharded"
    shutil.copytree(tmp_path / "final_model", sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(whole)
    write_safetensors(sharded, names, {n: tuple(whole[n].shape) for n in names},
                      {n: whole[n].dtype for n in names}, whole.__getitem__, max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    assert _test_loss(cfg, sharded) == pytest.approx(tested["loss"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    assert saved_names(AutoModelForCausalLM.from_pretrained(sharded)) == names


def test_streamed_export_of_a_lean_checkpoint_reads_the_frozen_weights_from_the_base(spawned, process_group):
    from safetensors.torch import load_file

    cfg, tmp_path, tested = spawned["local"]
    _same_as_built(cfg, tmp_path, tested, "fp32")
    exported, base = _tensors(tmp_path / "final_model"), load_file(tmp_path / "pretrained" / "model.safetensors")
    assert torch.equal(exported["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(exported["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
