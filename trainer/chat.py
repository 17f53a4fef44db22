"""A conversation as training text: rendered with a chat template (or plainly), with the character
spans that carry labels and where the last answer starts (what generation is asked to continue).

Labels come from the rendered conversation itself, never from rendering growing prefixes: a
template with `{% generation %}` blocks marks the assistant text itself (transformers' own
assistant mask); any other template is rendered once and each turn's text is found in order, the
end-of-turn marker after an assistant turn (found by rendering a probe conversation) joining its
span. A template that changes an assistant text while rendering it (one that strips reasoning from
earlier turns, say) cannot be labelled so: such a row is refused, naming the fix.

Tools on a template that does not read `tools` (SmolLM2's renders `content` for any role): the
definitions are appended to the system turn as JSON after TOOLS_HEADER, a call is assistant text
holding the call's JSON (trained like any assistant turn), and a tool result keeps the role `tool`
when the template renders a turn of that role, else becomes a user turn. "Reads tools": the
template's Jinja source uses the variable `tools`. Imports jinja2 and transformers inside functions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from trainer.config import ConfigError, DataConfig
from trainer.conversation import BadRow, Conversation, Turn

TEMPLATES = {  # data.chat_template by name
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
}
TOOLS_HEADER = "You can call these tools (JSON definitions); answer a call as JSON {\"name\", \"arguments\"}:\n"
_PROBE_Q, _PROBE_A, _PROBE_T = "sft-probe-question", "sft-probe-answer", "sft-probe-tool-result"


@dataclass(frozen=True)
class Template:
    source: str  # the Jinja text
    tools: bool  # it reads the `tools` variable (tool definitions and calls are its to render)
    tool_role: bool  # it renders a turn of role "tool"
    marked: bool  # `{% generation %}` blocks mark the assistant text
    end: str  # what follows an assistant turn's text: the end-of-turn marker ("" when none)


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character spans whose tokens carry labels
    answer_at: int  # where the last assistant turn's text starts: a generation prompt is text[:answer_at]
    reference: str  # that turn's text


def _apply(tokenizer, source: str, messages: list[dict], tools, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=source, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def template(d: DataConfig, tokenizer) -> Optional[Template]:
    """The chat template the rows are rendered with (None: plain text), from data.chat_template,
    data.template and the tokenizer."""
    import re

    import jinja2
    import jinja2.meta

    source = TEMPLATES.get(d.chat_template, d.chat_template) if d.chat_template else tokenizer.chat_template
    if isinstance(source, dict):  # a tokenizer with several named templates: the default one
        source = source.get("default")
    if d.template == "plain":
        return None
    if source is None:
        if d.template == "chat":
            raise ConfigError("data.template is 'chat' but the tokenizer has no chat template; set data.chat_template "
                              "(chatml, llama3 or a Jinja template), use data.template: plain (prompt + response + eos) "
                              "or a tokenizer with a template (model.tokenizer)")
        return None
    try:
        used = jinja2.meta.find_undeclared_variables(jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(
            re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)))
        probe = [{"role": "user", "content": _PROBE_Q}, {"role": "assistant", "content": _PROBE_A}]
        text = _apply(tokenizer, source, probe, None)
    except Exception as err:  # jinja2 raises several kinds; the template, not the data, is at fault
        raise ConfigError(f"data.chat_template: the chat template cannot render a conversation "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if _PROBE_A not in text:
        raise ConfigError("data.chat_template: the chat template does not render an assistant turn's content")
    after = text[text.index(_PROBE_A) + len(_PROBE_A):]
    end = after.split("\n")[0].rstrip() if after.strip() else ""
    try:
        tool_role = _PROBE_T in _apply(tokenizer, source, [*probe, {"role": "tool", "content": _PROBE_T}], None)
    except Exception:  # a template that refuses unknown roles or enforces alternation
        tool_role = False
    marked = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
    return Template(source, "tools" in used, tool_role, marked, end)


def _calls_text(calls: tuple[dict, ...]) -> str:
    return json.dumps(calls[0] if len(calls) == 1 else list(calls), ensure_ascii=False)


def messages_for(conv: Conversation, tpl: Template) -> tuple[list[dict], Optional[list]]:
    """The template's messages (and tools): the fallbacks above for a template without tools."""
    turns = list(conv.turns)
    if conv.tools and not tpl.tools:
        listed = TOOLS_HEADER + json.dumps([t["function"] for t in conv.tools], ensure_ascii=False)
        if turns and turns[0].role == "system":
            turns[0] = Turn("system", turns[0].content + "\n\n" + listed)
        else:
            turns.insert(0, Turn("system", listed))
    out = []
    for t in turns:
        if t.tool_calls and tpl.tools:
            out.append({"role": "assistant", "content": t.content,
                        "tool_calls": [{"type": "function", "function": c} for c in t.tool_calls]})
        elif t.tool_calls:
            out.append({"role": "assistant", "content": (t.content + "\n" if t.content else "") + _calls_text(t.tool_calls)})
        elif t.role == "tool" and not (tpl.tools or tpl.tool_role):
            out.append({"role": "user", "content": t.content})
        else:
            out.append({"role": t.role, "content": t.content})
    return out, ([dict(t) for t in conv.tools] if conv.tools and tpl.tools else None)


def _with_end(text: str, end: int, marker: str) -> int:
    """Where an assistant span ends: after its end-of-turn marker when the marker follows its text."""
    rest = text[end:]
    gap = len(rest) - len(rest.lstrip())
    return end + gap + len(marker.strip()) if marker.strip() and rest.lstrip().startswith(marker.strip()) else end


def render(conv: Conversation, tpl: Optional[Template], tokenizer, d: DataConfig) -> Rendered:
    """The conversation's text and labelled spans (data.train_on, data.train_on_eos). A BadRow
    says what is wrong with the row; a ConfigError what is wrong with the settings."""
    if tpl is None:
        if [t.role for t in conv.turns] != ["user", "assistant"] or conv.tools:
            why = "data.template is 'plain'" if d.template == "plain" else "the tokenizer has no chat template"
            raise ConfigError(f"{why}, and plain text (prompt + response + eos) holds one exchange, but the data has "
                              f"system turns, tools or several turns: set data.chat_template (chatml, llama3 or a "
                              f"Jinja template) or use a tokenizer with a chat template")
        prompt, response = conv.turns[0].content, conv.turns[1].content
        text = prompt + response
        eos = (tokenizer.eos_token or "") if d.train_on_eos else ""  # the labelled part of the eos
        spans = ((0, len(text) + len(eos)),) if d.train_on == "all" else ((len(prompt), len(text) + len(eos)),)
        return Rendered(text + (tokenizer.eos_token or ""), spans, len(prompt), response.strip())
    messages, tools = messages_for(conv, tpl)
    try:
        if tpl.marked:
            from transformers.utils.chat_template_utils import render_jinja_template

            (text,), (marks,) = render_jinja_template([messages], tools=tools, chat_template=tpl.source,
                                                      return_assistant_tokens_mask=True,
                                                      **tokenizer.special_tokens_map)
            found = [(int(a), int(b)) for a, b in marks]
        else:
            text, found = _apply(tokenizer, tpl.source, messages, tools), []
    except Exception as err:  # jinja2's TemplateError (the template's raise_exception), or its TypeError
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadRow(None, f"the chat template refuses this conversation: {message}") from None
    if len(found) != len(conv.answers):
        found = _locate(text, messages, tpl, tokenizer, tools)
    marker = tpl.end.strip()
    cores: list = []
    for span in found:  # each answer's own text (a generation mark may hold the marker too)
        if span is not None:
            inner = text[span[0]:span[1]].rstrip()
            inner = inner[:-len(marker)].rstrip() if marker and inner.endswith(marker) else inner
            span = (span[0], span[0] + len(inner))
        cores.append(span)
    checked = list(enumerate(cores, 1)) if d.train_on == "assistant" else [(len(cores), cores[-1])]
    for k, span in checked:
        if span is None:
            raise BadRow(None, f"the chat template does not render the text of assistant turn {k} of {len(cores)} as "
                             f"given (it changes, reorders or drops it), so its tokens cannot be labelled; use a template with "
                             f"{{% generation %}} markers (data.chat_template)"
                             + ("" if k == len(cores) else ", or data.train_on: last"))
    spans = [(a, _with_end(text, b, tpl.end) if d.train_on_eos else b) for a, b in filter(None, cores)]
    chosen = ((0, len(text)),) if d.train_on == "all" else tuple(spans[-1:] if d.train_on == "last" else spans)
    last = cores[-1]
    return Rendered(text, chosen, last[0], text[last[0]:last[1]].strip())


def _locate(text: str, messages: list[dict], tpl: Template, tokenizer, tools) -> list:
    """Each assistant turn's (start, end) in the rendered text, every turn's text found in order
    (None for an assistant text the template does not render as given)."""
    spans: list = []
    cursor = 0
    for i, m in enumerate(messages):
        piece = (m.get("content") or "").strip()
        if m["role"] == "assistant" and m.get("tool_calls") and not piece:
            # A call the template renders in its own syntax: what this turn adds to the conversation,
            # less the turn's header (where a plain assistant text would start).
            before = _apply(tokenizer, tpl.source, messages[:i], tools)
            upto = _apply(tokenizer, tpl.source, messages[:i + 1], tools)
            probe = _apply(tokenizer, tpl.source, [*messages[:i], {"role": "assistant", "content": _PROBE_A}], tools)
            start = len(before) + max(probe.find(_PROBE_A, len(before)) - len(before), 0)
            if not (text.startswith(upto) and upto.startswith(before) and probe.startswith(before)) or start < cursor:
                spans.append(None)
                continue
            spans.append((start, len(upto)))
            cursor = len(upto)
            continue
        at = text.find(piece, cursor) if piece else -1
        if at >= 0:
            cursor = at + len(piece)
        if m["role"] == "assistant":
            spans.append((at, cursor) if at >= 0 else None)
    return spans
