"""Chat templates: our sandboxed rendering against transformers' apply_chat_template(tokenize=False)
on real-world template shapes (ChatML / Qwen2.5 with tools, Llama 3.1, Mistral [INST])."""

from __future__ import annotations

import functools

import pytest
import tokenizers
from tokenizers import models

from pipeload.errors import PipeloadError
from pipeload.tokenizer.chat import ChatTemplateError, NoChatTemplateError, render_chat_template
from pipeload.tokenizer.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA31 = """{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson(sort_keys=true, separators=(",", ":")) }}
        {{- "}<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LOOP_CONTROLS = """{%- set ns = namespace(turns=0) %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if ns.turns > 3 %}{% break %}{% endif %}
    {%- if m.role == 'assistant' %}
<A>{% generation %}{{ m.content }}{% endgeneration %}</A>
    {%- else %}
<{{ m.role|upper }} n={{ loop.index }}>{{ m.content }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<A>{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city & region",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi <b>there</b> & you"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "日本語で 😀"}],
    "tools": [{"role": "user", "content": "Weather in Zürich?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "b": 1}}}]},
              {"role": "tool", "content": "22°C, sunny"}, {"role": "tool", "content": "{\"uv\": 3}"},
              {"role": "user", "content": "Thanks"}],
    "long": [{"role": "system", "content": "s"}] + [{"role": r, "content": f"turn {i}"}
                                                      for i, r in enumerate(["user", "assistant"] * 3)],
}

CASES = [
    ("chatml", CHATML, "single"), ("chatml", CHATML, "system"), ("qwen25", QWEN25, "single"),
    ("qwen25", QWEN25, "system"), ("qwen25", QWEN25, "tools"), ("llama31", LLAMA31, "single"),
    ("llama31", LLAMA31, "system"), ("llama31", LLAMA31, "tools"), ("mistral", MISTRAL, "single"),
    ("loop_controls", LOOP_CONTROLS, "long"), ("loop_controls", LOOP_CONTROLS, "system"),
]


@functools.cache
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("name,template,conversation", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(name, template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation == "tools" else None
    theirs = hf_tokenizer().apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    ours = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                bos_token="<s>", eos_token="</s>", tools=tools)
    assert ours == theirs
    if tools:
        assert "Zürich" in ours and "<now> in a city & region" in ours  # tojson: no ASCII or HTML escaping


def test_template_raising_on_alternating_roles():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf_tokenizer().apply_chat_template(messages, chat_template=MISTRAL, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate user/assistant") as info:
        render_chat_template(MISTRAL, messages, bos_token="<s>", eos_token="</s>")
    assert isinstance(info.value, PipeloadError)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        render_chat_template(MISTRAL, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


def test_missing_or_broken_templates_raise_clear_errors():
    with pytest.raises(NoChatTemplateError, match="no chat template.*plain text prompt"):
        render_chat_template(None, [{"role": "user", "content": "hi"}])
    tok = Tokenizer(tokenizers.Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(NoChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat_template("{% for m in messages %}{{ m.content }}", [])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TypeError, match="list of dicts"):
        render_chat_template(CHATML, "hello")


def test_sandbox_keeps_messages_immutable_and_hides_internals():
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template("{% set _ = messages.append({'role': 'evil'}) %}", messages)
    assert messages == [{"role": "user", "content": "x"}]
    assert render_chat_template("{{ messages.__class__ }}", messages) == ""
    assert "20" in render_chat_template("{{ strftime_now('%Y') }}", messages)


def test_tokenizer_apply_chat_template_passes_its_special_tokens():
    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok = Tokenizer(backend, bos_token_id=1, eos_token_id=2, chat_template=MISTRAL)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(messages) == "<s>[INST] a [/INST]b</s>"
