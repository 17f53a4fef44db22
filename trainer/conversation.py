"""Instruction data as users hold it, read into one shape: a conversation of turns.

Four formats (data.format), the ones LLaMA-Factory, Axolotl, TRL and OpenAI files use:
- pair: a prompt column and a response column (one exchange);
- alpaca: instruction + input (joined by a newline when the input is non-empty) as the user turn,
  output as the assistant turn, optional system and history ([instruction, output] pairs before it);
- messages: a list of {role, content} turns (OpenAI / Hugging Face chat), with tool_calls on
  assistant turns and tool turns;
- sharegpt: a `conversations` list of {from, value} turns (human/gpt/system/function_call/observation).
All four may have a system column and a tools column (a list of tool definitions, or a JSON string
of one, as LLaMA-Factory stores it). Column names, turn keys and role names are renamed in the
config (data.*_column, data.message_keys, data.roles) instead of converting files. Pure: imports only
the stdlib and the config schema; how a conversation becomes tokens lives in trainer/chat.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from trainer.config import ConfigError, DataConfig, ROLES

FORMATS = ("pair", "alpaca", "messages", "sharegpt")
# The names a role goes by in files, unless data.roles replaces them (a role's own name always counts).
DEFAULT_ROLE_NAMES = {"system": ("system",), "user": ("user", "human"), "assistant": ("assistant", "gpt", "model"),
                      "tool": ("tool", "observation", "function"), "function_call": ("function_call",)}
TURN_KEYS = {"messages": {"role": "role", "content": "content", "tool_calls": "tool_calls"},
             "sharegpt": {"role": "from", "content": "value", "tool_calls": "tool_calls"}}
COLUMNS = {"pair": {"prompt": "prompt", "response": "response"},
           "alpaca": {"prompt": "instruction", "response": "output"},
           "messages": {"messages": "messages"}, "sharegpt": {"messages": "conversations"}}
SAMPLE = 20  # rows auto detection looks at


class BadRow(ValueError):
    """What is wrong with one row (not with the settings: that is a ConfigError): the run stops naming
    file, row and column, or data.skip_bad_rows skips the row. `column`: the cell at fault (None: the
    conversation as a whole, in whichever column holds it)."""

    def __init__(self, column: Optional[str], problem: str) -> None:
        super().__init__(problem)
        self.column, self.problem = column, problem

    def __reduce__(self):  # rebuilt with both fields where it crosses a process (datasets.map workers)
        return type(self), (self.column, self.problem)


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant | tool
    content: str
    # An assistant turn's calls, [{"name", "arguments"}] (arguments: a mapping when they are JSON).
    tool_calls: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    tools: tuple[dict, ...] = ()  # tool definitions, {"type": "function", "function": {name, description, parameters}}

    @property
    def answers(self) -> list[int]:
        """Positions of the assistant turns (the ones that can carry labels)."""
        return [i for i, t in enumerate(self.turns) if t.role == "assistant"]


@dataclass(frozen=True)
class Reading:
    """How the rows of one file are read: the format and every name it uses, resolved."""
    format: str
    why: str  # for the startup summary: how auto detection decided (or "data.format")
    prompt: str = ""
    response: str = ""
    query: str = ""
    history: str = ""
    messages: str = ""
    system: str = ""
    tools: str = ""
    role_key: str = "role"
    content_key: str = "content"
    calls_key: str = "tool_calls"
    roles: dict = field(default_factory=dict)  # a name in the file -> its role
    system_prompt: Optional[str] = None

    def describe(self) -> str:
        shown = {"pair": f"'{self.prompt}' / '{self.response}'", "alpaca": f"'{self.prompt}' + '{self.query}' / '{self.response}'",
                 "messages": f"'{self.messages}' ({{{self.role_key}, {self.content_key}}} turns)",
                 "sharegpt": f"'{self.messages}' ({{{self.role_key}, {self.content_key}}} turns)"}[self.format]
        return f"{self.format} from {shown} ({self.why})"


def role_names(d: DataConfig) -> dict[str, str]:
    """A name in the file -> the role it stands for (data.roles replaces a role's default names)."""
    out: dict[str, str] = {}
    for role in ROLES:
        names = d.roles.get(role, DEFAULT_ROLE_NAMES[role])
        for name in (role, *([names] if isinstance(names, str) else names)):
            if out.get(name, role) != role:
                raise ConfigError(f"data.roles: the name {name!r} stands for both {out[name]!r} and {role!r}")
            out[name] = role
    return out


def reading(d: DataConfig, fmt: str, why: str = "data.format") -> Reading:
    keys = {**TURN_KEYS.get(fmt, TURN_KEYS["messages"]), **d.message_keys}
    cols = COLUMNS[fmt]
    return Reading(fmt, why, prompt=d.prompt_column or cols.get("prompt", ""),
                   response=d.response_column or cols.get("response", ""), query=d.query_column,
                   history=d.history_column, messages=d.messages_column or cols.get("messages", ""),
                   system=d.system_column, tools=d.tools_column, role_key=keys["role"], content_key=keys["content"],
                   calls_key=keys["tool_calls"], roles=role_names(d), system_prompt=d.system_prompt)


def expected(d: DataConfig) -> str:
    """Each format's columns, as a refusal lists them."""
    r = {f: reading(d, f) for f in FORMATS}
    return (f"pair: '{r['pair'].prompt}' and '{r['pair'].response}' (data.prompt_column, data.response_column); "
            f"alpaca: '{r['alpaca'].prompt}' and '{r['alpaca'].response}', optional '{d.query_column}', "
            f"'{d.history_column}', '{d.system_column}'; messages: '{r['messages'].messages}', a list of "
            f"{{{r['messages'].role_key}, {r['messages'].content_key}}} turns (data.messages_column, "
            f"data.message_keys); sharegpt: '{r['sharegpt'].messages}', a list of "
            f"{{{r['sharegpt'].role_key}, {r['sharegpt'].content_key}}} turns")


def _first_turn(rows: Sequence[dict], column: str) -> Optional[dict]:
    for row in rows:
        value = row.get(column)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return value[0]
    return None


def detect(columns: Sequence[str], rows: Sequence[dict], d: DataConfig, source: str) -> Reading:
    """The format of a file from its columns (and the turn keys of its first rows): data.format,
    or auto detection; a file that fits no format, or several, is refused naming what was found."""
    present = set(columns)

    def missing(r: Reading) -> list[str]:
        need = {"pair": [r.prompt, r.response], "alpaca": [r.prompt, r.response]}.get(r.format, [r.messages])
        return [c for c in need if c not in present]

    if d.format != "auto":
        r = reading(d, d.format)
        if missing(r):
            raise ConfigError(f"{source}: data.format is {d.format!r}, but the file has no column "
                              f"{', '.join(repr(c) for c in missing(r))}; found columns: {', '.join(columns) or 'none'} "
                              f"(rename them with data.*_column, or see what each format reads: {expected(d)})")
        return r
    found = []
    for fmt in FORMATS:
        r = reading(d, fmt)
        if missing(r):
            continue
        if fmt in ("messages", "sharegpt"):
            first = _first_turn(rows, r.messages)
            if first is None:
                why = f"column '{r.messages}' holds no list of turns in its first rows"
                found.append((fmt, r, False, why))
                continue
            if r.role_key not in first or r.content_key not in first:
                continue  # the other chat format's keys (or neither)
            why = f"column '{r.messages}' holds {{{r.role_key}, {r.content_key}}} turns"
        else:
            why = f"columns '{r.prompt}' and '{r.response}'"
        found.append((fmt, r, True, why))
    usable = [(fmt, r, why) for fmt, r, ok, why in found if ok]
    # Two readings of the same columns read the same rows: alpaca without an input or history
    # column is a pair; a chat column with the configured keys reads alike as messages or sharegpt.
    pair, alpaca = (next((u for u in usable if u[0] == f), None) for f in ("pair", "alpaca"))
    if pair and alpaca and (pair[1].prompt, pair[1].response) == (alpaca[1].prompt, alpaca[1].response):
        extras = [c for c in (alpaca[1].query, alpaca[1].history) if c in present]
        usable.remove(pair if extras else alpaca)
        if extras:
            usable[usable.index(alpaca)] = ("alpaca", alpaca[1], f"{alpaca[2]}, with '{extras[0]}'")
    chats = [u for u in usable if u[0] in ("messages", "sharegpt")]
    if len(chats) == 2 and len({(u[1].messages, u[1].role_key, u[1].content_key) for u in chats}) == 1:
        usable.remove(chats[1])
    if len(usable) == 1:
        fmt, r, why = usable[0]
        return reading(d, fmt, f"auto: {why}")
    listed = ", ".join(columns) or "none"
    if not usable:
        hint = "".join(f"; {why}" for _, _, ok, why in found if not ok)
        raise ConfigError(f"{source}: cannot tell the data format from its columns (found: {listed}{hint}); "
                          f"expected one of {expected(d)}; or set data.format and the data.*_column keys")
    raise ConfigError(f"{source}: the columns fit several formats ({', '.join(f for f, _, _ in usable)}; found: "
                      f"{listed}); set data.format to the one to read")


# ---------------------------------------------------------------- one row


def cell_text(value: Any, column: str, what: str = "") -> str:
    """`what`: the part of the cell at fault ("" for the whole cell)."""
    what = what + " " if what else ""
    if not isinstance(value, str):
        raise BadRow(column, f"{what}must be text, got {value!r}")
    if not value.strip():
        raise BadRow(column, f"{what}is empty")
    return value


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _calls(value: Any, column: str, where: str) -> tuple[dict, ...]:
    """OpenAI's [{type, function: {name, arguments}}], or bare {name, arguments}: as [{name, arguments}]."""
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        call = call.get("function", call) if isinstance(call, dict) else call
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise BadRow(column, f"{where}: a tool call must be {{name, arguments}}, got {value!r}")
        out.append({"name": call["name"], "arguments": _arguments(call.get("arguments", {}))})
    return tuple(out)


def _tools(value: Any, column: str) -> tuple[dict, ...]:
    """A tools cell: a list of definitions, a JSON string of one, or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadRow(column, f"is neither a list of tool definitions nor a JSON string of one ({err.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRow(column, f"is neither a list of tool definitions nor a JSON string of one: {value!r:.80}")
    return tuple(t if "function" in t else {"type": "function", "function": t} for t in value)


def chat_turns(value: Any, r: Reading) -> list[Turn]:
    column = r.messages
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise BadRow(column, f"must be a non-empty list of {{{r.role_key}, {r.content_key}}} turns")
    turns = []
    for n, m in enumerate(value, 1):
        name = m.get(r.role_key)
        role = r.roles.get(name) if isinstance(name, str) else None
        if role is None:
            known = ", ".join(sorted(r.roles))
            raise BadRow(column, f"turn {n} has the role {name!r} ({r.role_key!r}), which is not one the data "
                                     f"knows ({known}; add names with data.roles)")
        content = m.get(r.content_key)
        if role == "function_call":  # ShareGPT: the assistant's call, its JSON as the content
            try:
                parsed = json.loads(content) if isinstance(content, str) else content
            except json.JSONDecodeError:
                raise BadRow(column, f"turn {n} is a function call whose {r.content_key!r} is not JSON") from None
            turns.append(Turn("assistant", "", _calls(parsed, column, f"turn {n}")))
            continue
        calls = _calls(m[r.calls_key], column, f"turn {n}") if role == "assistant" and m.get(r.calls_key) else ()
        if calls and content in (None, ""):
            turns.append(Turn(role, "", calls))
            continue
        turns.append(Turn(role, cell_text(content, column, f"turn {n}'s {r.content_key!r}"), calls))
    return turns


def read(record: dict, r: Reading) -> Conversation:
    """One row as a conversation; a BadRow says what is wrong with it."""
    if r.format == "pair":
        turns = [Turn("user", cell_text(record[r.prompt], r.prompt)),
                 Turn("assistant", cell_text(record[r.response], r.response))]
    elif r.format == "alpaca":
        instruction = cell_text(record[r.prompt], r.prompt)
        extra = record.get(r.query)
        if extra is not None and not isinstance(extra, str):
            raise BadRow(r.query, f"must be text, got {extra!r}")
        turns = []
        for n, pair in enumerate(record.get(r.history) or [], 1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise BadRow(r.history, f"entry {n} must be an [instruction, output] pair, got {pair!r}")
            turns += [Turn("user", cell_text(pair[0], r.history, f"entry {n}'s instruction")),
                      Turn("assistant", cell_text(pair[1], r.history, f"entry {n}'s output"))]
        turns += [Turn("user", instruction + ("\n" + extra if extra and extra.strip() else "")),
                  Turn("assistant", cell_text(record[r.response], r.response))]
    else:
        turns = chat_turns(record[r.messages], r)
    system = record.get(r.system)
    if system is not None and not isinstance(system, str):
        raise BadRow(r.system, f"must be text, got {system!r}")
    if not any(t.role == "system" for t in turns):
        default = system if system and system.strip() else r.system_prompt
        if default:
            turns.insert(0, Turn("system", default))
    if not any(t.role == "assistant" for t in turns):
        raise BadRow(r.messages or r.response, "the conversation has no assistant turn to learn")
    return Conversation(tuple(turns), _tools(record.get(r.tools), r.tools))
