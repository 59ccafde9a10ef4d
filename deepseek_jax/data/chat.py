"""Chat templates: conversations -> token ids with a loss weight on the assistant's tokens.

    template = chat.load_template("auto", "path/to/hf_dir")   # tokenizer_config.json's
    text = template.render(messages, add_generation_prompt=True)
    ids, weights = chat.tokenize_conversation(tokenizer, template, messages)

`data.chat_template`: "auto" renders with the `chat_template` of the checkpoint's
tokenizer_config.json, through jinja2's ImmutableSandboxedEnvironment set up as
transformers does it (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a JSON `tojson`, `bos_token`/`eos_token`/... from the config): a Hub
template is untrusted code, and the sandbox is what keeps it from reaching Python
internals. "none" joins the message contents as they are (no template).

Which tokens are the assistant's is found by rendering prefixes, which works for any
template: the conversation up to the assistant turn k with the generation prompt gives
where turn k starts, the conversation through turn k gives where it ends. Each such
piece is tokenised on its own, so a span boundary is also a token boundary and the
prompt part tokenises exactly as it does at inference (prompt encoded, completion
sampled after it). A template whose renders are not prefixes of one another (one that
rewrites earlier turns, e.g. drops past reasoning) cannot be split this way, and such
a row is an error naming it, never a silently mis-masked example.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

CHAT_TEMPLATES = ("auto", "none")
ROLES_WITH_LOSS = ("assistant",)


class TemplateMismatch(ValueError):
    """A conversation the template cannot render, or cannot split into turns."""


def _compile(source: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # a dependency in setup.cfg; only a broken install lacks it
        raise ImportError("chat templates need jinja2>=3.1.6: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        # assistant mask; here it renders its body (the spans come from prefixes instead).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json stores a token either as a string or as {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled jinja chat template and the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: Optional[Mapping[str, str]] = None, name: str = "template"):
        self.source, self.name = source, name
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateMismatch(f"the chat template of {self.name} refused the conversation: {e}") from e

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


def find_tokenizer_config(path: str) -> Optional[str]:
    """tokenizer_config.json of a checkpoint directory or beside a tokenizer.json file."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidate = os.path.join(folder, "tokenizer_config.json")
    return candidate if os.path.isfile(candidate) else None


def load_template(kind: str, tokenizer_path: Optional[str]) -> Optional[ChatTemplate]:
    """`data.chat_template` -> a ChatTemplate ("auto"), or None ("none": plain concatenation)."""
    if kind == "none":
        return None
    if kind != "auto":
        raise ValueError(f"data.chat_template={kind!r}: use one of {CHAT_TEMPLATES}")
    config_path = find_tokenizer_config(tokenizer_path) if tokenizer_path and tokenizer_path != "byte" else None
    if config_path is None:
        raise ValueError(f"data.chat_template='auto' reads the chat_template of a tokenizer_config.json beside "
                         f"the tokenizer, and data.tokenizer={tokenizer_path!r} has none; point data.tokenizer "
                         "at a checkpoint directory that has one, or set data.chat_template='none'")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        raise ValueError(f"{config_path} has no 'chat_template' string; set data.chat_template='none' "
                         "to concatenate the messages instead")
    special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return ChatTemplate(source, {k: v for k, v in special.items() if v is not None}, name=config_path)


# ----- rows -> conversations ---------------------------------------------------------------

def check_messages(value) -> Optional[str]:
    """None if `value` is a list of {"role": str, "content": str} dicts, else what is wrong."""
    if not isinstance(value, list) or not value:
        return f"'messages' must be a non-empty list of {{'role', 'content'}} objects, got {type(value).__name__}"
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            return f"messages[{i}] is {type(m).__name__}, expected an object with 'role' and 'content'"
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                return f"messages[{i}] has no string {key!r} (it has {sorted(m)})"
    return None


def as_messages(value, role: str) -> list[dict]:
    """A string or a message list (TRL's conversational rows) -> a message list."""
    return [{"role": role, "content": value}] if isinstance(value, str) else [dict(m) for m in value]


def sft_messages(record: Mapping[str, Any]) -> list[dict]:
    """An SFT row, {"messages": [...]} or {"prompt", "response"}, as a conversation."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    return as_messages(record["prompt"], "user") + as_messages(record["response"], "assistant")


# ----- conversations -> ids and loss weights -------------------------------------------------

def split_turns(template: ChatTemplate, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant) pieces (module docstring)."""
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] not in ROLES_WITH_LOSS:
            continue
        start = template.render(messages[:k], add_generation_prompt=True)
        end = template.render(messages[:k + 1])
        if not (start.startswith(done) and end.startswith(start)):
            raise TemplateMismatch(
                f"the chat template does not render message {k} ({message['role']}) after the earlier turns "
                "unchanged (it rewrites or reorders them), so the assistant tokens cannot be found; use "
                "data.chat_template='none' or a template whose renders are prefixes of each other")
        pieces += [(start[len(done):], False), (end[len(start):], True)]
        done = end
    full = template.render(messages)
    if not full.startswith(done):
        raise TemplateMismatch("the chat template renders the whole conversation differently from its turns")
    pieces.append((full[len(done):], False))
    return [(text, assistant) for text, assistant in pieces if text]


def tokenize_conversation(tokenizer, template: Optional[ChatTemplate],
                          messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """Token ids and per-id loss weights (1 on assistant tokens) of one conversation.

    template None ("none"): bos, then each message's content as it is, with an eos after
    every assistant message (content and eos weighted 1). With a template, the template
    writes every special token (bos included) itself.
    """
    if not any(m["role"] in ROLES_WITH_LOSS for m in messages):
        raise TemplateMismatch(f"the conversation has no assistant message (roles {[m['role'] for m in messages]}); "
                               "SFT learns only from assistant turns")
    ids, weights = [], []
    if template is None:
        ids, weights = [tokenizer.bos_id], [0.0]
        for m in messages:
            assistant = m["role"] in ROLES_WITH_LOSS
            piece = tokenizer.encode(m["content"], add_eos=assistant)
            ids += piece
            weights += [float(assistant)] * len(piece)
        return ids, weights
    for text, assistant in split_turns(template, messages):
        piece = tokenizer.encode(text)
        ids += piece
        weights += [float(assistant)] * len(piece)
    return ids, weights


def prompt_text(template: Optional[ChatTemplate], messages: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """What the model is given to continue as the assistant (None: no template, the caller
    encodes the prompt with bos as before)."""
    if template is None:
        return None
    return template.render(messages, add_generation_prompt=True)
