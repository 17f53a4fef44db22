"""The data users already have (Alpaca, ShareGPT, OpenAI messages, pairs) read into conversations,
and what trains: the labelled tokens, decoded, are exactly the assistant texts (with the end-of-turn
marker) under real chat templates, tools included; bad rows name file, line and column."""
import json
import pickle

import pytest

from tests.helpers import SMOLLM2
from trainer.chat import TOOLS_HEADER, render, template
from trainer.config import ConfigError, DataConfig
from trainer.config_load import from_dict
from trainer.conversation import BadRow, Turn, detect, read
from trainer.data import Split
from trainer.tasks.common import NoUsableRows
from trainer.masking import IGNORE, mask_labels
from trainer.tasks.registry import get_task

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
          "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
# No generation markers: add_generation_prompt is ignored, so "the prompt of a turn" cannot come from it.
NO_GENERATION_PROMPT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# Qwen3-style: earlier assistant turns lose their reasoning when more turns follow.
_STRIP = ("{%- for m in messages %}{%- set c = m['content'] %}{%- if m['role'] == 'assistant' and not loop.last %}"
          "{%- set c = c.split('</think>')[-1] | trim %}{%- endif %}<|im_start|>{{ m['role'] }}\n")
REASONING = _STRIP + "{{ c }}<|im_end|>\n{%- endfor %}"
REASONING_MARKED = (_STRIP + "{%- if m['role'] == 'assistant' %}{% generation %}{{ c }}<|im_end|>{% endgeneration %}"
                    "{%- else %}{{ c }}<|im_end|>{%- endif %}\n{%- endfor %}")
ALTERNATING = ("{%- for m in messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}")
# Reads `tools` and renders calls in its own syntax.
WITH_TOOLS = ("{%- if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{%- endif %}{%- for m in messages %}"
              "<|im_start|>{{ m['role'] }}\n{%- if m.tool_calls %}{%- for c in m.tool_calls %}<tool_call>"
              "{{ c.function | tojson }}</tool_call>{%- endfor %}{%- else %}{{ m['content'] }}{%- endif %}<|im_end|>\n"
              "{%- endfor %}")

TWO_TURNS = [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "Answer: 4."},
             {"from": "human", "value": "And 3 plus 3?"}, {"from": "gpt", "value": "Answer: 6."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.helpers import make_tokenizer

    t = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("bpe")))
    t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return t


def data(**keys) -> DataConfig:
    return DataConfig(train_file="d.jsonl", **keys)


def rendered(tok, row: dict, **keys):
    d = data(**keys)
    out = render(read(row, detect(list(row), [row], d, "d.jsonl")), template(d, tok), tok, d)
    return out


def learned(tok, row: dict, **keys) -> list[str]:
    """The labelled tokens of a row, decoded run by run."""
    out = rendered(tok, row, **keys)
    enc = tok(out.text, add_special_tokens=False, return_offsets_mapping=True)
    labels = mask_labels(enc["input_ids"], enc["offset_mapping"], out.spans)
    runs, run = [], []
    for t in labels + [IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def test_mask_labels_keeps_tokens_starting_inside_spans():
    ids = [10, 11, 12, 13, 14]
    offsets = [(0, 0), (0, 3), (3, 8), (8, 9), (9, 13)]  # a BOS-like special token first
    assert mask_labels(ids, offsets, [(8, 13)]) == [IGNORE, IGNORE, IGNORE, 13, 14]


# ---------------------------------------------------------------- formats


def test_auto_detection_names_the_format_and_why():
    cases = {"pair": {"prompt": "q", "response": "a"},
             "alpaca": {"instruction": "q", "input": "", "output": "a"},
             "messages": {"messages": [{"role": "user", "content": "q"}]},
             "sharegpt": {"conversations": [{"from": "human", "value": "q"}]}}
    for fmt, row in cases.items():
        r = detect(list(row), [row], data(), "d.jsonl")
        assert r.format == fmt and r.why.startswith("auto: ")
    assert "column 'conversations' holds {from, value} turns" in detect(
        ["conversations"], [cases["sharegpt"]], data(), "d.jsonl").describe()
    # Alpaca without an input or history column reads exactly as a pair of those columns: one reading, no ambiguity.
    assert detect(["instruction", "output"], [{}], data(prompt_column="instruction", response_column="output"),
                  "d.jsonl").format == "pair"


def test_unrecognised_and_ambiguous_files_are_refused_naming_columns():
    with pytest.raises(ConfigError, match=r"d.jsonl: cannot tell the data format from its columns \(found: question, "
                                          r"answer\); expected one of pair: 'prompt' and 'response'.*alpaca: "
                                          r"'instruction' and 'output'.*sharegpt: 'conversations'"):
        detect(["question", "answer"], [{"question": "q", "answer": "a"}], data(), "d.jsonl")
    row = {"prompt": "q", "response": "a", "messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(ConfigError, match=r"the columns fit several formats \(pair, messages; .*set data.format"):
        detect(list(row), [row], data(), "d.jsonl")
    with pytest.raises(ConfigError, match=r"data.format is 'alpaca', but the file has no column 'instruction', 'output'"):
        detect(["prompt", "response"], [{}], data(format="alpaca"), "d.jsonl")


def test_alpaca_joins_instruction_and_input_and_reads_system_and_history():
    row = {"instruction": "Translate to French.", "input": "cheese", "output": "fromage", "system": "Be brief.",
           "history": [["Translate to French: bread", "pain"]]}
    conv = read(row, detect(list(row), [row], data(), "d.jsonl"))
    assert [(t.role, t.content) for t in conv.turns] == [
        ("system", "Be brief."), ("user", "Translate to French: bread"), ("assistant", "pain"),
        ("user", "Translate to French.\ncheese"), ("assistant", "fromage")]
    row = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert read(row, detect(list(row), [row], data(), "d.jsonl")).turns[0] == Turn("user", "Say hi.")


def test_renamed_columns_keys_and_roles_read_a_file_as_it_is():
    row = {"dialog": [{"speaker": "customer", "text": "Where is my order?"}, {"speaker": "agent", "text": "On its way."}]}
    d = data(messages_column="dialog", message_keys={"role": "speaker", "content": "text"},
             roles={"user": ["customer"], "assistant": ["agent"]})
    conv = read(row, detect(list(row), [row], d, "d.jsonl"))
    assert [(t.role, t.content) for t in conv.turns] == [("user", "Where is my order?"), ("assistant", "On its way.")]
    with pytest.raises(ConfigError, match=r"data.roles: unknown role 'customer'; the roles are system, user"):
        from_dict({"model": {"name_or_path": "x"}, "data": {"train_file": "d.jsonl", "roles": {"customer": ["user"]}}})
    with pytest.raises(ConfigError, match=r"data.roles: the name 'bot' stands for both 'user' and 'assistant'"):
        read(row, detect(list(row), [row], data(roles={"user": ["bot"], "assistant": ["bot"]}), "d.jsonl"))


def test_system_prompt_fills_rows_without_one():
    row = {"prompt": "q", "response": "a"}
    conv = read(row, detect(list(row), [row], data(system_prompt="You are terse."), "d.jsonl"))
    assert conv.turns[0] == Turn("system", "You are terse.")
    row = {"prompt": "q", "response": "a", "system": "Own prompt."}
    assert read(row, detect(list(row), [row], data(system_prompt="x"), "d.jsonl")).turns[0].content == "Own prompt."


# ---------------------------------------------------------------- what trains, under real templates


@pytest.mark.parametrize("source, marker", [(SMOLLM2, "<|im_end|>"), (CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"),
                                            (NO_GENERATION_PROMPT, "<|im_end|>")])
def test_labelled_tokens_are_exactly_the_assistant_texts_and_marker(tok, source, marker):
    row = {"conversations": TWO_TURNS}
    assert learned(tok, row, chat_template=source) == [f"Answer: 4.{marker}", f"Answer: 6.{marker}"]
    assert learned(tok, row, chat_template=source, train_on_eos=False) == ["Answer: 4.", "Answer: 6."]
    assert learned(tok, row, chat_template=source, train_on="last") == [f"Answer: 6.{marker}"]
    out = rendered(tok, row, chat_template=source, train_on="all")
    assert out.spans == ((0, len(out.text)),)
    # Generation answers the last turn with the earlier ones as context, whatever carries labels.
    assert out.reference == "Answer: 6." and out.text[:out.answer_at].rstrip().endswith("assistant" if marker != "<|eot_id|>"
                                                                                        else "<|end_header_id|>")
    assert "And 3 plus 3?" in out.text[:out.answer_at] and "Answer: 6." not in out.text[:out.answer_at]


def test_a_template_that_rerenders_earlier_turns_is_labelled_from_its_marks_or_refused(tok):
    row = {"conversations": [{"from": "human", "value": "Add 2 and 2."}, {"from": "gpt", "value": "<think>2+2</think>Four."},
                             {"from": "human", "value": "Add 3 and 3."}, {"from": "gpt", "value": "<think>3+3</think>Six."}]}
    # The rendered conversation is what trains: the earlier turn as the template shows it (no reasoning).
    assert learned(tok, row, chat_template=REASONING_MARKED) == ["Four.<|im_end|>", "<think>3+3</think>Six.<|im_end|>"]
    with pytest.raises(BadRow, match=r"does not render the text of assistant turn 1 of 2 as given .* "
                                         r"\{% generation %\} markers \(data.chat_template\), or data.train_on: last"):
        rendered(tok, row, chat_template=REASONING)
    assert learned(tok, row, chat_template=REASONING, train_on="last") == ["<think>3+3</think>Six.<|im_end|>"]


def test_a_template_that_refuses_the_conversation_is_a_bad_row(tok):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                             {"from": "gpt", "value": "Anything else?"}]}
    with pytest.raises(BadRow, match=r"the chat template refuses this conversation: Conversation roles must alternate"):
        rendered(tok, row, chat_template=ALTERNATING)


def test_a_bad_row_and_an_empty_split_are_typed_errors_that_keep_their_fields():
    """What the task reads off them are fields, never their text (also after crossing a process)."""
    r = detect(["prompt", "response"], [{"prompt": "Hi", "response": "Hello."}], data(), "d.jsonl")
    with pytest.raises(BadRow) as caught:
        read({"prompt": None, "response": "Hello."}, r)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (again.column, again.problem, str(again)) == ("prompt", "must be text, got None", "must be text, got None")
    empty = pickle.loads(pickle.dumps(NoUsableRows("d.jsonl: no usable row in the train split (2 too long)", {"too long": 2})))
    assert isinstance(empty, ConfigError) and empty.dropped == {"too long": 2} and str(empty).startswith("d.jsonl: no usable")


TOOLS = [{"name": "weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}]
CALL = {"name": "weather", "arguments": {"city": "Oslo"}}


def test_tools_on_a_template_without_tool_support_follow_the_documented_fallback(tok):
    row = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                             {"from": "function_call", "value": json.dumps(CALL)},
                             {"from": "observation", "value": "Rain, 8 C"}, {"from": "gpt", "value": "Rainy, 8 C."}],
           "tools": json.dumps(TOOLS)}  # LLaMA-Factory stores the definitions as a JSON string
    out = rendered(tok, row, chat_template=SMOLLM2)
    assert f"<|im_start|>system\n{TOOLS_HEADER}{json.dumps(TOOLS)}<|im_end|>" in out.text  # replaces the default system
    assert "<|im_start|>tool\nRain, 8 C<|im_end|>" in out.text  # SmolLM2's template renders any role
    assert learned(tok, row, chat_template=SMOLLM2) == [json.dumps(CALL) + "<|im_end|>", "Rainy, 8 C.<|im_end|>"]
    # A template that refuses unknown roles gets the tool result as a user turn.
    strict = ("{%- for m in messages %}{%- if m['role'] not in ['system', 'user', 'assistant'] %}"
              "{{ raise_exception('unknown role') }}{%- endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{%- endfor %}")
    assert "<|im_start|>user\nRain, 8 C<|im_end|>" in rendered(tok, row, chat_template=strict).text


def test_openai_tool_calls_on_a_template_with_tools_are_its_own_syntax_and_train(tok):
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "weather",
                                                                         "arguments": json.dumps(CALL["arguments"])}}]},
                        {"role": "tool", "content": "Rain, 8 C"}, {"role": "assistant", "content": "Rainy, 8 C."}],
           "tools": [{"type": "function", "function": TOOLS[0]}]}
    d = data(chat_template=WITH_TOOLS)
    assert template(d, tok).tools
    assert learned(tok, row, chat_template=WITH_TOOLS) == [
        f"<tool_call>{json.dumps(CALL)}</tool_call><|im_end|>", "Rainy, 8 C.<|im_end|>"]


@pytest.mark.parametrize("row, problem", [  # problems in the 'conversations' column, unless said
    ({"conversations": [{"from": "customer", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
     r"turn 1 has the role 'customer' \('from'\), which is not one the data knows \(assistant, function, function_call, "
     r"gpt, human, model, observation, system, tool, user; add names with data.roles\)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}, r"turn 2's 'value' is empty"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, r"the conversation has no assistant turn to learn"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "tools": "{not json"},
     r"is neither a list of tool definitions nor a JSON string of one"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "tools": 7},
     r"is neither a list of tool definitions nor a JSON string of one"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                        {"from": "gpt", "value": "More?"}]}, r"the chat template refuses this conversation: Conversation roles must alternate"),
])
def test_bad_rows_name_file_line_and_column_and_can_be_skipped(tok, row, problem):
    rows = [row, {"conversations": TWO_TURNS}]  # the first row's keys are the columns
    cfg = from_dict({"model": {"name_or_path": "x", "task": "causal_lm"},
                     "data": {"train_file": "chats.jsonl", "chat_template": ALTERNATING}})
    task = get_task("causal_lm")
    column = "tools" if "tool definitions" in problem else "conversations"
    with pytest.raises(ConfigError, match=rf"chats.jsonl, validation split, line 1, column '{column}': {problem}"):
        task.prepare(Split.from_records("validation", "chats.jsonl", rows), cfg, tok, [])
    skipping = from_dict({**{"model": {"name_or_path": "x", "task": "causal_lm"}},
                          "data": {"train_file": "chats.jsonl", "chat_template": ALTERNATING, "skip_bad_rows": True}})
    prepared = task.prepare(Split.from_records("validation", "chats.jsonl", rows), skipping, tok, [])
    assert len(prepared) == 1 and sum(prepared.dropped.values()) == 1


def test_prepared_rows_carry_the_last_turn_as_the_generation_prompt(tok):
    cfg = from_dict({"model": {"name_or_path": "x", "task": "causal_lm"},
                     "data": {"train_file": "c.jsonl", "chat_template": "chatml", "train_on": "all"}})
    prepared = get_task("causal_lm").prepare(Split.from_records("test", "c.jsonl", [{"conversations": TWO_TURNS}]),
                                             cfg, tok, [])
    example, at = prepared.examples([0])[0], prepared.column("answer_at", [0])[0]
    assert all(t != IGNORE for t in example["labels"])  # train_on: all labels every token ...
    assert tok.decode(example["input_ids"][:at]).endswith("And 3 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    assert prepared.column("reference", [0]) == ["Answer: 6."]  # ... the prompt still comes from the turns


def test_the_schema_knows_every_named_template():
    from trainer.chat import TEMPLATES
    from trainer.config import CHAT_TEMPLATES

    assert set(CHAT_TEMPLATES) == set(TEMPLATES)  # data.chat_template's check at load and the templates agree
