"""The DeepSpeed config derived from ours."""
import json

import pytest

from trainer.config import ConfigError
from trainer.config_load import from_dict
from trainer.ds_config import deepspeed_config, resolve_precision


def cfg(**sections):
    raw = {"model": {"name_or_path": "gpt2"}, "data": {"train_file": "x"},
           "train": {"micro_batch_size": 4, "gradient_accumulation": 3}, **sections}
    return from_dict(raw)


def test_batch_sizes_and_stage_come_from_our_config():
    ds = deepspeed_config(cfg(deepspeed={"zero_stage": 3}), world_size=4, precision="fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 48 and ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no JIT-compiled FusedAdam on CPU
    assert ds["optimizer"]["params"]["fused"] is True  # torch's fused AdamW: no temporaries
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 1.0


def test_offload_uses_cpu_adam_and_offloads_params_at_stage_3():
    ds = deepspeed_config(cfg(deepspeed={"zero_stage": 3, "offload": "cpu"}), 1, "bf16")
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["optimizer"]["params"]["torch_adam"] is False and ds["bf16"] == {"enabled": True}
    assert "fused" not in ds["optimizer"]["params"]  # DeepSpeed's CPU Adam takes no such argument


def test_user_json_is_the_base_but_cannot_contradict_batch_sizes(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "communication_data_type": "fp32"}))
    ds = deepspeed_config(cfg(deepspeed={"config_file": str(f)}), 2, "fp32")
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["communication_data_type"] == "fp32"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="sets train_micro_batch_size_per_gpu = 16 but the run config gives 4"):
        deepspeed_config(cfg(deepspeed={"config_file": str(f)}), 2, "fp32")


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_capable_gpus():
    assert resolve_precision("auto", has_cuda=False, has_bf16=False) == "fp32"
    assert resolve_precision("auto", has_cuda=True, has_bf16=True) == "bf16"
    assert resolve_precision("auto", has_cuda=True, has_bf16=False) == "fp32"
    assert resolve_precision("fp16", has_cuda=False, has_bf16=False) == "fp16"


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'; it comes from optim.*"),
    ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'"),
    ({"bf16": {"enabled": True}}, "sets 'bf16'; it comes from deepspeed.precision"),
    ({"zero_optimization": {"stage": 1}}, "sets zero_optimization.stage = 1 but deepspeed.zero_stage is 2"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ("{not json", "is not valid JSON")])
def test_user_json_may_not_set_what_our_config_owns(tmp_path, content, message):
    f = tmp_path / "ds.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        deepspeed_config(cfg(deepspeed={"config_file": str(f)}), 2, "fp32")


def test_model_state_memory_per_worker_by_stage():
    from trainer.ds_config import model_state_bytes

    n = 1_000_000
    assert model_state_bytes(n, n, 0, 2, "fp32") == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}
    assert model_state_bytes(n, n, 1, 2, "fp32") == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 4 * n}
    assert model_state_bytes(n, n, 2, 2, "fp32") == {"weights": 4 * n, "gradients": 2 * n, "optimizer": 4 * n}
    assert model_state_bytes(n, n, 3, 4, "fp32") == {"weights": n, "gradients": n, "optimizer": 2 * n}
    # mixed precision: 16-bit weights and gradients, fp32 master weights + Adam moments (16 bytes/param in all)
    assert sum(model_state_bytes(n, n, 0, 1, "bf16").values()) == 16 * n
    # local fine-tuning: frozen weights still count, only the trainable part has gradients and states
    assert model_state_bytes(n, n // 10, 2, 2, "fp32") == {"weights": 4 * n, "gradients": n // 5, "optimizer": 2 * n // 5}


def test_test_phase_and_export_memory_and_which_phase_is_the_peak():
    """#27: the test evaluation holds the weights and fp32 masters (no gradients, no moments), under
    ZeRO-3 the gathered model too; the streamed export one tensor; --dry-run names the peak phase."""
    from launcher.plan import Plan, memory_line
    from trainer.ds_config import export_bytes, test_phase_bytes

    n = 1_000_000
    assert test_phase_bytes(n, n, 0, 2, "fp32", True) == {"weights": 4 * n, "masters": 0}
    assert test_phase_bytes(n, n, 3, 2, "fp32", True) == {"weights": 2 * n, "masters": 2 * n, "gathered": 2 * n}
    assert test_phase_bytes(n, n, 3, 2, "fp32", False) == {"weights": 2 * n, "masters": 2 * n}
    assert export_bytes(n, n // 100, True, 2) == 6 * (n // 100) and export_bytes(n, n // 100, True, 4) == 4 * (n // 100)
    assert export_bytes(n, n // 100, False, 2) == 4 * n
    plan = Plan(2, 2, 4, {"train": 8}, 3, n, n, "", None, largest=n // 100)
    line = memory_line(plan, cfg(deepspeed={"zero_stage": 3, "precision": "fp32"}))
    assert "test evaluation 0.01 GiB" in line and "export (rank 0) 0.00 GiB (streamed" in line
    assert line.endswith("the peak: training steps; activations on top")
    lora = memory_line(plan, cfg(deepspeed={"zero_stage": 3, "precision": "fp32"}, finetune={"mode": "lora"}))
    assert "(streamed 0.00)" in lora  # export.lora: merged streams, merging each layer as it is read
    both = memory_line(plan, cfg(deepspeed={"zero_stage": 3, "precision": "fp32"}, finetune={"mode": "lora"},
                                 export={"lora": "both"}))
    assert "(built model 0.00)" in both  # peft's adapter folder comes from the built model


def test_zero_buckets_follow_the_model_size_unless_the_json_sets_them(tmp_path):
    ds = deepspeed_config(cfg(deepspeed={"zero_stage": 3}), 2, "fp32", hidden_size=64)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 12 * 64 * 64
    assert "reduce_bucket_size" not in deepspeed_config(cfg(deepspeed={"zero_stage": 0}), 2, "fp32", hidden_size=64)[
        "zero_optimization"]
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123, "stage3_max_reuse_distance": 1e9}}))
    ds = deepspeed_config(cfg(deepspeed={"zero_stage": 2, "config_file": str(f)}), 2, "fp32", hidden_size=64)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    ds = deepspeed_config(cfg(deepspeed={"zero_stage": 3, "config_file": str(f)}), 2, "fp32", hidden_size=64)
    assert ds["zero_optimization"]["stage3_max_reuse_distance"] == 1e9
