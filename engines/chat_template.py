"""Chat-template handling derived from the template itself, never typed per model family.

The Magpie pre-query prefix, the end-of-turn stop strings and the assistant header are found by
rendering conversations that hold unique sentinel strings and cutting the text around them, so
any Hugging Face chat template (ChatML, Llama-3, Gemma, Mistral, Phi-3, ...) works unchanged.

A "template source" is a HF tokenizer (anything with `chat_template` and `apply_chat_template`),
a `ChatTemplate`, or a jinja string (then pass `special_tokens={"bos_token": ..., ...}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence
from schemas import SchemaError

Messages = Sequence[Mapping[str, str]]

# Unique strings that no template produces by itself; the parts of the rendering around them
# are the template's own text. No leading/trailing whitespace: many templates `trim` content.
_USER_1 = "AFSENTINELUSERONE"
_ASSISTANT_1 = "AFSENTINELASSISTANTONE"
_USER_2 = "AFSENTINELUSERTWO"

_SPECIAL_TOKEN_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class ChatTemplateError(SchemaError):
    """A chat template that is missing or can't render what we need; the message says how to fix it."""


@lru_cache(maxsize=64)
def _compile(template: str):
    # Same environment as transformers' apply_chat_template, so a template renders identically.
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 ships with transformers
        raise ChatTemplateError("rendering chat templates needs jinja2. Fix: pip install 'jinja2>=3.1'") from exc

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template plus the special-token strings it refers to (`bos_token`, ...)."""

    template: str
    special_tokens: tuple[tuple[str, str], ...] = ()
    name: str = "chat template"

    @classmethod
    def from_string(cls, template: str, special_tokens: Mapping[str, str] | None = None,
                    name: str = "chat template") -> "ChatTemplate":
        return cls(template, tuple(sorted((special_tokens or {}).items())), name)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatTemplate":
        template = getattr(tokenizer, "chat_template", None)
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if isinstance(template, dict):  # several named templates: the default one is for chat
            template = template.get("default") or next(iter(template.values()), None)
        if not template:
            raise ChatTemplateError(
                f"the tokenizer of {name!r} has no chat template (tokenizer.chat_template is empty), so chat "
                "messages can't be rendered and no Magpie pre-query prefix can be derived. Fix: use an "
                "instruct/chat model, or give one explicitly (engine option chat_template='<jinja string>' "
                "or tokenizer.chat_template = ...)")
        specials = {attr: str(getattr(tokenizer, attr)) for attr in _SPECIAL_TOKEN_ATTRS
                    if getattr(tokenizer, attr, None) is not None}
        return cls.from_string(template, specials, name=str(name))

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return _compile(self.template).render(messages=[dict(m) for m in messages],
                                                  add_generation_prompt=add_generation_prompt,
                                                  **dict(self.special_tokens))
        except jinja2.TemplateError as exc:
            roles = [m.get("role") for m in messages]
            raise ChatTemplateError(f"{self.name}: the chat template refused the conversation with roles {roles}: "
                                    f"{exc}. Fix: change the conversation to what this template accepts "
                                    "(e.g. no system turn for Gemma, alternating user/assistant for Mistral)") from exc


def as_template(source: Any, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
    """A tokenizer, a ChatTemplate or a jinja string -> ChatTemplate (clear error when there is none)."""
    if isinstance(source, ChatTemplate):
        return source
    if isinstance(source, str):
        if not source.strip():
            raise ChatTemplateError("empty chat template string. Fix: pass the jinja chat template text")
        return ChatTemplate.from_string(source, special_tokens)
    if hasattr(source, "chat_template") or hasattr(source, "apply_chat_template"):
        return ChatTemplate.from_tokenizer(source)
    raise ChatTemplateError(f"can't get a chat template from a {type(source).__name__}. Fix: pass a Hugging Face "
                            "tokenizer, a ChatTemplate or a jinja template string")


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> str:
    """Render one conversation with the model's chat template (as the model was trained to see it)."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"message {i} of the conversation is {message!r}; each message must be a dict "
                                    "with 'role' and 'content'. Fix: pass [{'role': 'user', 'content': '...'}, ...]")
    return as_template(tokenizer).render(messages, add_generation_prompt=add_generation_prompt)


def _cut(text: str, sentinel: str, what: str, template: ChatTemplate) -> tuple[str, str]:
    before, found, after = text.partition(sentinel)
    if not found:
        raise ChatTemplateError(f"{template.name}: the rendered {what} does not contain the message text, so the "
                                "template rewrites or drops message content and its parts can't be derived. "
                                "Fix: pass an explicit chat template that renders message content verbatim")
    return before, after


@dataclass(frozen=True)
class TemplateParts:
    """What Magpie-style generation needs to know about a chat template."""

    pre_query_prefix: str  # rendered conversation up to where the (next) user text starts
    user_turn_end: str  # marker ending a user message (e.g. "<|im_end|>", "[/INST]"); "" if none
    assistant_turn_end: str  # marker ending an assistant message (e.g. "<|eot_id|>", "</s>"); "" if none
    assistant_header: str  # the generation prompt (e.g. "<|im_start|>assistant\n"); "" for Mistral [INST]
    user_header: str  # text opening a user turn after an assistant turn (e.g. "<|im_start|>user\n")

    @property
    def stops(self) -> tuple[str, ...]:
        """End-of-turn stop strings, whitespace-trimmed, de-duplicated, most specific first."""
        candidates = [self.user_turn_end, self.assistant_turn_end]
        if not self.user_turn_end:  # plain-text separators ("USER: ... ASSISTANT:"): stop at the next header
            candidates += [self.assistant_header, self.user_header]
        out: list[str] = []
        for s in (c.strip() for c in candidates):
            if s and s not in out:
                out.append(s)
        return tuple(out)


def template_parts(source: Any, system: str | None = None, history: Messages = (), *,
                   special_tokens: Mapping[str, str] | None = None) -> TemplateParts:
    """Derive prefix / stops / headers by rendering sentinel conversations.

    `system`: an explicit system prompt (None keeps whatever default system turn the template
    injects, e.g. SmolLM2 / Qwen2.5). `history`: earlier user/assistant turns (Magpie multi-turn:
    the prefix then asks the model for the next user message)."""
    template = as_template(source, special_tokens)
    lead: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
    lead += [dict(m) for m in history]

    prefix, _ = _cut(template.render(lead + [{"role": "user", "content": _USER_1}]), _USER_1,
                     "user turn", template)

    # Turn ends and headers come from a plain user/assistant/user exchange with no system turn
    # (they don't depend on the system prompt). The gap between two messages is
    # "<end of turn marker><header of the next turn>"; the marker is the first special-token-like
    # piece of the gap. Templates differ in where they put it (Phi-3 appends "<|assistant|>" to
    # every user turn, some append eos only when add_generation_prompt is off), so gaps between
    # two sentinels are used rather than the end of a rendering.
    user_only = [{"role": "user", "content": _USER_1}]
    ua = user_only + [{"role": "assistant", "content": _ASSISTANT_1}]
    text_u = template.render(user_only, add_generation_prompt=False)
    text_u_gen = template.render(user_only, add_generation_prompt=True)
    _, after_user = _cut(template.render(ua), _USER_1, "user turn", template)
    gap_user_assistant, _ = _cut(after_user, _ASSISTANT_1, "assistant turn", template)
    _, after_assistant = _cut(template.render(ua + [{"role": "user", "content": _USER_2}]), _ASSISTANT_1,
                              "assistant turn", template)
    gap_assistant_user, _ = _cut(after_assistant, _USER_2, "second user turn", template)

    markers = _marker_pattern(template)
    user_end, header_rest = _split_at_marker(gap_user_assistant, markers)
    assistant_end, user_header = _split_at_marker(gap_assistant_user, markers)
    generation_prompt = text_u_gen[len(text_u):] if text_u_gen.startswith(text_u) else ""
    return TemplateParts(prefix, user_end, assistant_end, generation_prompt or header_rest, user_header)


_MARKER = r"<\|[^|<>\s]+\|>|<｜[^｜<>]+｜>|</?[A-Za-z_][A-Za-z0-9_.-]*>|\[/?[A-Za-z_]+\]"


def _marker_pattern(template: ChatTemplate):
    import re

    # Special-token strings we know of (eos "</s>", "<|endoftext|>", ...) count as markers too.
    specials = sorted({v for _, v in template.special_tokens if v}, key=len, reverse=True)
    return re.compile("|".join([re.escape(v) for v in specials] + [_MARKER]))


def _split_at_marker(gap: str, markers) -> tuple[str, str]:
    """gap -> (end-of-turn marker, next header); ("", header) when the gap has no marker."""
    match = markers.search(gap)
    if match is None:
        return "", gap.strip()
    return match.group(0), gap[match.end():].lstrip()


def pre_query_prefix(source: Any, system: str | None = None, history: Messages = (), *,
                     special_tokens: Mapping[str, str] | None = None) -> str:
    """The template rendered up to where the user's text would start, and nothing after (Magpie)."""
    return template_parts(source, system, history, special_tokens=special_tokens).pre_query_prefix


def end_of_turn_stops(source: Any, *, special_tokens: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """End-of-turn stop strings (e.g. ("<|im_end|>",), ("<|eot_id|>",), ("[/INST]", "</s>"))."""
    return template_parts(source, special_tokens=special_tokens).stops


def assistant_header(source: Any, *, special_tokens: Mapping[str, str] | None = None) -> str:
    """The generation prompt opening the assistant's turn ("" when the template has none, e.g. Mistral)."""
    return template_parts(source, special_tokens=special_tokens).assistant_header


# ---------------------------------------------------------------- what generation steps need from a template

# Markers templates write themselves ("<|im_start|>", "<start_of_turn>", "[INST]"), found by rendering.
_TEMPLATE_MARKER = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜<>]+｜>|</?[a-z_]+_of_turn>|\[/?INST\]")


def stop_strings(tokenizer: Any, *, early_stop: bool) -> tuple[str, ...]:
    """Stops for sampling a user query: end-of-turn stops + the assistant header (+ newline for
    single-line queries, Magpie's "early stop")."""
    stops = [s for s in end_of_turn_stops(tokenizer) if isinstance(s, str) and s]
    header = assistant_header(tokenizer).strip()
    if header:
        stops.append(header)
    if early_stop:
        stops.append("\n")
    return tuple(dict.fromkeys(stops))


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Token ids that end a turn: eos plus the end-of-turn stops that are single tokens."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    for stop in end_of_turn_stops(tokenizer):
        if isinstance(stop, int):
            ids.append(stop)
        elif isinstance(stop, str):
            tid = tokenizer.convert_tokens_to_ids(stop) if hasattr(tokenizer, "convert_tokens_to_ids") else None
            unk = getattr(tokenizer, "unk_token_id", None)
            if isinstance(tid, int) and tid != unk:
                ids.append(tid)
    return tuple(dict.fromkeys(ids))


def template_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Strings that must never appear in a query or answer: the tokenizer's special tokens and
    the template's own markers (end-of-turn stops, assistant header)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    found.update(s for s in end_of_turn_stops(tokenizer) if isinstance(s, str))
    sample = render(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    add_generation_prompt=False)
    found.update(_TEMPLATE_MARKER.findall(sample))
    header = assistant_header(tokenizer).strip()
    if header:
        found.add(header)
    return tuple(sorted(t for t in found if t and len(t) > 1 and not t.isspace()))


@lru_cache(maxsize=8)
def _header_token_ids(tokenizer: Any) -> tuple[int, ...]:
    vocab = tokenizer.get_vocab()
    ids = []
    for token, tid in vocab.items():
        text = tokenizer.convert_tokens_to_string([token])
        if text.lstrip().startswith("#"):
            ids.append(tid)
    return tuple(sorted(ids))


def header_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of tokens whose text starts with "#" (markdown headers), to bias at the first position."""
    try:
        return _header_token_ids(tokenizer)
    except TypeError:  # unhashable tokenizer object: compute without the cache
        return _header_token_ids.__wrapped__(tokenizer)
