"""Selective freezing as pure functions over parameter names."""
import pytest

from trainer.config import ConfigError, FinetuneConfig
from trainer.freezing import Layout, select_trainable, summarize

NAMES = ["embed.weight", "layers.0.q.weight", "layers.0.norm.weight", "layers.1.q.weight",
         "layers.1.norm.weight", "layers.2.q.weight", "layers.2.norm.weight", "norm.weight", "head.weight"]
LAYOUT = Layout("layers.", 3, frozenset({"embed.weight"}), frozenset({"head.weight"}))
TIED = Layout("layers.", 3, frozenset({"embed.weight"}), frozenset(), tied_head=True)


def local(**kw):
    return FinetuneConfig(mode="local", **kw)


def test_global_mode_trains_everything():
    assert select_trainable(NAMES, FinetuneConfig(), LAYOUT) == set(NAMES)


def test_patterns_select_only_matches():
    assert select_trainable(NAMES, local(train=("layers.1.*", "head.*")), LAYOUT) == {
        "layers.1.q.weight", "layers.1.norm.weight", "head.weight"}


def test_last_k_blocks_plus_head():
    got = select_trainable(NAMES, local(train_last_layers=2, train_head=True), LAYOUT)
    assert got == {"layers.1.q.weight", "layers.1.norm.weight", "layers.2.q.weight", "layers.2.norm.weight",
                   "head.weight"}


def test_freeze_only_starts_from_everything():
    got = select_trainable(NAMES, local(freeze=("*.norm.*", "norm.weight")), LAYOUT)
    assert got == {"embed.weight", "layers.0.q.weight", "layers.1.q.weight", "layers.2.q.weight", "head.weight"}


def test_embeddings_flag_false_removes_them_and_tied_head_means_embeddings():
    assert "embed.weight" not in select_trainable(NAMES, local(train_embeddings=False), LAYOUT)
    assert select_trainable(NAMES, local(train_last_layers=0, train_head=True), TIED) == {"embed.weight"}


def test_freeze_wins_over_train():
    got = select_trainable(NAMES, local(train=("layers.*",), freeze=("layers.0.*",)), LAYOUT)
    assert not any(n.startswith("layers.0.") for n in got) and "layers.2.q.weight" in got


def test_pattern_matching_nothing_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"finetune.train\[1\] = 'decoder.\*' matches no parameter"):
        select_trainable(NAMES, local(train=("head.*", "decoder.*")), LAYOUT)
    with pytest.raises(ConfigError, match=r"finetune.freeze\[0\] = 'nope' matches no parameter"):
        select_trainable(NAMES, local(freeze=("nope",)), LAYOUT)


def test_nothing_left_to_train_is_an_error():
    with pytest.raises(ConfigError, match="leave nothing to train"):
        select_trainable(NAMES, local(freeze=("*",)), LAYOUT)


def test_more_blocks_than_the_model_has():
    with pytest.raises(ConfigError, match="train_last_layers = 5 but the model has only 3 transformer blocks"):
        select_trainable(NAMES, local(train_last_layers=5), LAYOUT)


def test_summary_is_compact_per_block():
    sizes = [(n, 10) for n in NAMES]
    line = summarize(sizes, {"layers.2.q.weight", "layers.2.norm.weight", "layers.1.q.weight"}, LAYOUT)
    assert line.startswith("trainable 30 / 90 parameters (33.33%)")
    assert "blocks [.pT]" in line


def test_layout_of_a_real_model_on_the_meta_device():
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.freezing import describe_layout

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    layout = describe_layout(model)
    assert (layout.block_prefix, layout.num_blocks, layout.tied_head) == ("transformer.h.", 3, True)
    assert layout.embedding_names == {"transformer.wte.weight", "transformer.wpe.weight"}
