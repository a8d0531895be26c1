"""Chat-template derivation on five template families written out here (no weights) + SmolLM2."""

from __future__ import annotations

import pytest

from engines import chat_template as ct

CHATML_QWEN = (  # ChatML that injects a default system turn (Qwen2.5 style)
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_PLAIN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PHI3 = (  # appends eos when no generation prompt is asked for
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_OLD = (  # puts the assistant header after every user turn, whatever add_generation_prompt says
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n' + '<|assistant|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
)
VICUNA = (  # plain-text separators, no markup between user and assistant
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

LLAMA_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
GEMMA_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>"}
MISTRAL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
PHI_SPECIALS = {"bos_token": "<s>", "eos_token": "<|endoftext|>"}

# (template, specials, prefix, stops, assistant header, user header)
FAMILIES = {
    "chatml-default-system": (CHATML_QWEN, {}, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                              ("<|im_end|>",), "<|im_start|>assistant\n", "<|im_start|>user\n"),
    "chatml": (CHATML_PLAIN, {}, "<|im_start|>user\n", ("<|im_end|>",), "<|im_start|>assistant\n", "<|im_start|>user\n"),
    "llama3": (LLAMA3, LLAMA_SPECIALS, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", ("<|eot_id|>",),
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|start_header_id|>user<|end_header_id|>\n\n"),
    "gemma": (GEMMA, GEMMA_SPECIALS, "<bos><start_of_turn>user\n", ("<end_of_turn>",), "<start_of_turn>model\n",
              "<start_of_turn>user\n"),
    "mistral": (MISTRAL, MISTRAL_SPECIALS, "<s>[INST] ", ("[/INST]", "</s>"), "", "[INST] "),
    "phi3": (PHI3, PHI_SPECIALS, "<|user|>\n", ("<|end|>",), "<|assistant|>\n", "<|user|>\n"),
    "phi3-old": (PHI3_OLD, PHI_SPECIALS, "<s><|user|>\n", ("<|end|>",), "<|assistant|>\n", "<|user|>\n"),
    "vicuna": (VICUNA, MISTRAL_SPECIALS, "USER: ", ("</s>", "ASSISTANT:", "USER:"), "ASSISTANT:", "USER: "),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parts_derived_per_family(family):
    template, specials, prefix, stops, header, user_header = FAMILIES[family]
    parts = ct.template_parts(template, special_tokens=specials)
    assert parts.pre_query_prefix == prefix
    assert parts.stops == stops
    assert parts.assistant_header == header
    assert parts.user_header == user_header
    assert ct.pre_query_prefix(template, special_tokens=specials) == prefix
    assert ct.end_of_turn_stops(template, special_tokens=specials) == stops
    assert ct.assistant_header(template, special_tokens=specials) == header


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_is_exactly_what_the_template_renders_before_user_text(family):
    # Magpie's contract: prefix + instruction is a prefix of the real rendered conversation.
    template, specials, prefix, *_ = FAMILIES[family]
    instruction = "Explain how tides work."
    text = ct.ChatTemplate.from_string(template, specials).render(
        [{"role": "user", "content": instruction}], add_generation_prompt=True)
    assert text.startswith(prefix + instruction)


def test_explicit_system_prompt_replaces_default_one():
    prefix = ct.pre_query_prefix(CHATML_QWEN, system="You ask hard questions.")
    assert prefix == "<|im_start|>system\nYou ask hard questions.<|im_end|>\n<|im_start|>user\n"
    prefix = ct.pre_query_prefix(LLAMA3, system="Be terse.", special_tokens=LLAMA_SPECIALS)
    assert prefix == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\n")


def test_gemma_has_no_system_role_clear_error():
    with pytest.raises(ct.ChatTemplateError, match="System role not supported.*Fix"):
        ct.pre_query_prefix(GEMMA, system="x", special_tokens=GEMMA_SPECIALS)


def test_history_prefix_asks_for_the_next_user_turn():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert ct.pre_query_prefix(MISTRAL, history=history, special_tokens=MISTRAL_SPECIALS) == "<s>[INST] Hi [/INST]Hello!</s>[INST] "
    assert ct.pre_query_prefix(CHATML_PLAIN, history=history) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n")


def test_mistral_rejects_non_alternating_history():
    with pytest.raises(ct.ChatTemplateError, match="alternate"):
        ct.pre_query_prefix(MISTRAL, history=[{"role": "assistant", "content": "x"}], special_tokens=MISTRAL_SPECIALS)


def test_render_transformers_semantics():
    text = ct.render(ct.ChatTemplate.from_string(LLAMA3, LLAMA_SPECIALS), [{"role": "user", "content": "  hi  "}])
    # trim filter, bos_token variable and the generation prompt all applied
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert not ct.render(ct.ChatTemplate.from_string(CHATML_PLAIN), [{"role": "user", "content": "a"}],
                         add_generation_prompt=False).endswith("assistant\n")


def test_render_bad_message_clear_error():
    with pytest.raises(ct.ChatTemplateError, match="message 1.*role"):
        ct.render(CHATML_PLAIN, [{"role": "user", "content": "a"}, {"text": "b"}])


class _NoTemplateTokenizer:
    name_or_path = "some/base-model"
    chat_template = None

    def apply_chat_template(self, *a, **k):  # pragma: no cover - never reached
        raise AssertionError


def test_tokenizer_without_template_clear_error():
    with pytest.raises(ct.ChatTemplateError, match="some/base-model.*no chat template.*Fix"):
        ct.pre_query_prefix(_NoTemplateTokenizer())
    with pytest.raises(ct.ChatTemplateError, match="no chat template"):
        ct.render(_NoTemplateTokenizer(), [{"role": "user", "content": "x"}])


def test_template_dropping_content_is_reported():
    with pytest.raises(ct.ChatTemplateError, match="does not contain the message text"):
        ct.pre_query_prefix("{% for m in messages %}<turn>{% endfor %}")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from engines.embedded import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


def test_embedded_smollm2_tokenizer(smol_tokenizer):
    parts = ct.template_parts(smol_tokenizer)
    assert parts.pre_query_prefix.startswith("<|im_start|>system\n")  # default system turn kept
    assert parts.pre_query_prefix.endswith("<|im_end|>\n<|im_start|>user\n")
    assert parts.stops == ("<|im_end|>",)
    assert parts.assistant_header == "<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "What is 2+2?"}]
    # Our rendering is byte-identical to transformers' own apply_chat_template.
    assert ct.render(smol_tokenizer, messages) == smol_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
