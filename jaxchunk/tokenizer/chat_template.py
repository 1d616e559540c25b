"""Chat templates: the Jinja templates model files ship, rendered as transformers renders them."""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Sequence

from jaxchunk.errors import InputError, TokenizerError

Message = Mapping[str, Any]


def render_chat_template(template: str, messages: Sequence[Message], add_generation_prompt: bool = True, *,
                         source: str = "<chat template>", **variables: Any) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with the Jinja `template` as
    transformers' `apply_chat_template(messages, tokenize=False)` does: same sandboxed Jinja
    environment (`compile_chat_template`), and the template sees `messages`,
    `add_generation_prompt`, `tools=None`, `documents=None` and any `variables` (bos_token, ...).
    `source` names the template's file in errors.

    Raises TokenizerError if the template does not compile, InputError if it rejects the
    conversation (its `raise_exception(...)`) or the conversation is empty.
    """
    import jinja2

    if not messages:
        raise InputError("apply_chat_template(): the conversation is empty")
    if not all(isinstance(m, Mapping) for m in messages):
        raise InputError("apply_chat_template(): each message must be a dict "
                         "like {'role': 'user', 'content': '...'}")
    try:
        compiled = compile_chat_template(template)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"{source}: chat template does not compile: {e}") from e
    context = {"tools": None, "documents": None, **variables}  # callers may override the defaults
    # Like transformers: keys whose value is None are dropped (templates test for presence).
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compiled.render(messages=plain, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:  # raise_exception(), undefined fields, sandbox violations
        raise InputError(f"chat template of {source} rejected the conversation: {e}") from e


@functools.lru_cache(maxsize=8)
def compile_chat_template(source: str):
    """Compile a chat template in the environment transformers uses
    (transformers/utils/chat_template_utils.py): an immutable sandbox (templates come from model
    files, i.e. untrusted), trim_blocks + lstrip_blocks, the loopcontrols extension, a
    non-escaping `tojson`, and the globals `raise_exception` and `strftime_now`.
    `{% generation %}` blocks (used by transformers to mask assistant tokens) render their body."""
    import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


GEMMA_CHAT_TEMPLATE = (
    # Gemma 3's template (tokenizer_config.json of google/gemma-3-*-it), text content only: a
    # system message is folded into the first user turn; the assistant's role is "model". It
    # writes the BOS itself, so its rendering is encoded without adding another.
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""The chat template of Gemma vocabularies whose file ships none (the base Gemma 3 270M GGUF)."""
