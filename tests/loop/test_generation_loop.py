"""Generated answers on tiny real models in one process: left-padded batches answer as single prompts
do, answers stop at the end-of-turn token, and fine-tuning on the shipped data makes exact answers
appear. Two ZeRO-3 ranks generating together: tests/ranks/test_zero3_generation.py."""
import json

import pytest
import torch

from tests.helpers import tiny_config, tiny_gpt2, tiny_llama
from trainer.config_load import from_dict
from trainer.loop import WorkerArgs, run, run_test
from trainer.report import ListReporter


@pytest.mark.parametrize("arch", [tiny_gpt2(), tiny_llama()], ids=["gpt2", "llama"])
def test_left_padded_batches_answer_exactly_as_one_prompt_at_a_time(tmp_path, tokenizer_dir, arch):
    """Left padding must not change an answer: the attention mask and the position ids both follow it."""
    from transformers import AutoTokenizer

    from trainer.data import load_splits
    from trainer.evaluation import Shard, generator
    from trainer.model import build_model
    from trainer.tasks import causal_lm

    cfg = from_dict(tiny_config(tmp_path, tokenizer_dir, model={"architecture": arch, "tokenizer": str(tokenizer_dir)},
                                eval={"generate": {"max_new_tokens": 12}}))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepared = causal_lm.prepare(load_splits(cfg)[1], cfg, tokenizer, [])
    torch.manual_seed(0)
    model = build_model(cfg.model, None).eval()
    answers = {}
    for batch_size in (1, 6):
        shard = Shard(None, None, 0, 1, batch_size, "cpu", generator(model, synced=False))
        answers[batch_size] = causal_lm.generate(shard, prepared, tokenizer, 6, cfg.eval.generate)
    assert len(answers[6]) == 6 and answers[6] == answers[1]
    lengths = {len(tokenizer(r["prompt"])["input_ids"]) for r in answers[6]}
    assert len(lengths) > 1  # the batch really was padded
    assert len({r["answer"] for r in answers[6]}) > 1 and all(r["reference"].startswith("Answer: ") for r in answers[6])


def test_answers_stop_at_the_model_configs_end_of_turn_token(tmp_path, tokenizer_dir):
    """A chat model whose end of turn is not the tokenizer's eos (Llama 3's <|eot_id|>) lists it in its
    generation config; answers must stop there too, not run on to max_new_tokens."""
    from trainer.evaluation import generator
    from trainer.model import build_model

    cfg = from_dict(tiny_config(tmp_path, tokenizer_dir, model={"architecture": tiny_llama(), "tokenizer": str(tokenizer_dir)}))
    torch.manual_seed(0)
    model = build_model(cfg.model, None).eval()
    generate = generator(model, synced=False)
    prompt, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    model.generation_config.eos_token_id = None
    free = generate(prompt, mask, 12, eos_token_id=0, pad_token_id=0)[0, 4:].tolist()
    assert len(free) == 12 and 0 not in free  # greedy: the same answer each time
    end_of_turn = free[3]
    assert end_of_turn not in free[:3]
    model.generation_config.eos_token_id = [0, end_of_turn]
    stopped = generate(prompt, mask, 12, eos_token_id=0, pad_token_id=0)[0, 4:].tolist()
    assert stopped == free[:4]


def test_fine_tuning_makes_exact_answers_appear(tmp_path, tokenizer_dir, process_group):
    """300 steps of a 64-wide llama on the shipped data: before, no test answer is exact; after, some are
    (the memorisable kinds: capitals, letter counts, upper case)."""
    arch = {**tiny_llama(2), "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 4}
    cfg = from_dict(tiny_config(
        tmp_path, tokenizer_dir, model={"architecture": arch, "tokenizer": str(tokenizer_dir)},
        optim={"lr": 5e-3, "warmup_steps": 10, "scheduler": "linear"},
        train={"max_steps": 300, "eval_every": 150, "save_every": 300, "log_every": 100},
        eval={"generate": {"num_examples": 3, "max_new_tokens": 48}}, scaling={"workers_per_node": 1}))
    reporter = ListReporter(tmp_path / "ckpt")
    run(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache"), generations_dir=str(tmp_path / "generations")))
    result = run_test(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache"), final_checkpoint=str(reporter.calls[-1][1]),
                                                test_generations_path=str(tmp_path / "test_generations.jsonl")))
    assert result.before["exact_match"] == 0 and result.after["exact_match"] >= 3 / 35
    assert result.after["rougeL_f1"] > result.before["rougeL_f1"] + 0.4
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 35 and len({r["id"] for r in rows}) == 35
    assert sum(r["after"] == r["reference"] for r in rows) / 35 == result.after["exact_match"]
    assert sorted(p.name for p in (tmp_path / "generations").iterdir()) == ["step_0000150.jsonl", "step_0000300.jsonl"]
    assert len((tmp_path / "generations" / "step_0000300.jsonl").read_text().splitlines()) == 3
