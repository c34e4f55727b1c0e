"""``chat_template:`` of a merge config, as mergekit 0.1.5 sets it on the merged tokenizer.

A value is, by mergekit's rules (``mergekit.merge._set_chat_template``):

- ``auto``: the template most of the input models' tokenizers carry (each model counted once,
  stripped of surrounding whitespace; a tie goes to the first in config order, base first, where
  mergekit's choice follows a Python ``set``'s order); no model with a template: none is set;
- a name (shorter than 256 characters, no newline, no ``{``) of a built-in template in
  :data:`TEMPLATES`: ``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``;
- else a Jinja template itself (at least 20 characters, with a ``{``); anything else is an error.

The tokenizer of the output is then the tokenizer source's, loaded with ``AutoTokenizer``, given
the template and saved with ``save_pretrained`` (transformers 5 writes it to
``chat_template.jinja``), as mergekit re-serialises it. :data:`TEMPLATES` holds mergekit's
built-in templates (``mergekit/_data/chat_templates/<name>.jinja``) byte for byte (a test
compares them with the installed mergekit's files); long lines are split into adjacent literals.

License: those template texts are mergekit's (Copyright Arcee AI, LGPL-3.0-only, from
``mergekit/_data/chat_templates/``), reproduced unmodified so that merges name the same
templates; they remain under the LGPL-3.0 (https://www.gnu.org/licenses/lgpl-3.0.html).
The code around them is jaxarith's own.
"""

from __future__ import annotations

import collections
import os
import shutil
from collections.abc import Sequence

from jaxarith.errors import ConfigError
from jaxarith.io import refs as refs_lib

AUTO = "auto"


def parse(value) -> str:
    """The template text of a config's ``chat_template`` value, or :data:`AUTO`.

    Raises:
      ConfigError: not a string, an unknown name, or too short / without ``{`` for a template.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"chat_template: expected 'auto', a template name or a Jinja template, "
                          f"got {value!r}")
    if value == AUTO:
        return AUTO
    if len(value) < 256 and "\n" not in value and "{" not in value and value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template {value!r}: not 'auto', a built-in template "
                          f"({', '.join(sorted(TEMPLATES))}) nor a Jinja template")
    return value


def ref_dir(ref: str | os.PathLike) -> str:
    """The local directory of a model reference (an Orbax directory holds the tokenizer files
    of the checkpoint it was converted from)."""
    return refs_lib.resolve(ref).dir


def _load_tokenizer(directory: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def auto(refs: Sequence[str]) -> str | None:
    """The template most of ``refs``' tokenizers carry (see the module doc); None if none does.
    A model whose tokenizer does not load is skipped, as mergekit does."""
    found = []
    for ref in dict.fromkeys(os.fspath(r) for r in refs):
        try:
            template = _load_tokenizer(ref_dir(ref)).chat_template
        except Exception:  # mergekit: "Unable to load tokenizer", and goes on
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return collections.Counter(found).most_common(1)[0][0] if found else None


def stage_tokenizer(src: str, template: str | None, dst: str) -> None:
    """Write ``src``'s tokenizer with ``template`` set (None: unchanged) into ``dst``, as
    mergekit does (load, set, ``save_pretrained``); ``generation_config.json`` is copied along.

    Raises:
      ConfigError: ``src`` has no tokenizer that loads.
    """
    try:
        tok = _load_tokenizer(src)
    except Exception as e:
        raise ConfigError(f"chat_template: the tokenizer source {src} has no tokenizer to set "
                          f"the template on ({type(e).__name__}: {e})") from None
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(dst)
    gen = os.path.join(src, "generation_config.json")
    if os.path.exists(gen):
        shutil.copy2(gen, os.path.join(dst, "generation_config.json"))


TEMPLATES: dict[str, str] = {
    'alpaca': (
        "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).conten"
        "t|trim if (messages|selectattr('role', 'equalto', 'system')|list) else"
        " '' }}\n"
        '\n'
        '{% for message in messages %}\n'
        "{% if message['role'] == 'user' %}\n"
        '### Instruction:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        "{% elif message['role'] == 'assistant' %}\n"
        '### Response:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        "{% elif message['role'] == 'user_context' %}\n"
        '### Input:\n'
        "{{ message['content']|trim -}}\n"
        '{% if not loop.last %}\n'
        '\n'
        '\n'
        '{% endif %}\n'
        '{% endif %}\n'
        '{% endfor %}\n'
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        '\n'
        '### Response:\n'
        '{% endif %}\n'
    ),
    'chatml': (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'"
        " + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif "
        '%}\n'
    ),
    'exaone': (
        '{% for message in messages %}\n'
        "    {% if loop.first and message['role'] != 'system' %}\n"
        "        {{ '[|system|][|endofturn|]\\n' }}\n"
        '    {% endif %}\n'
        "    {{ '[|' + message['role'] + '|]' + message['content'] }}\n"
        "    {% if message['role'] == 'user' %}\n"
        "        {{ '\\n' }}\n"
        '    {% else %}\n'
        "        {{ '[|endofturn|]\\n' }}\n"
        '    {% endif %}\n'
        '{% endfor %}\n'
        '{% if add_generation_prompt %}\n'
        "    {{ '[|assistant|]' }}\n"
        '{% endif %}\n'
    ),
    'llama3': (
        '{% set loop_messages = messages %}\n'
        '{% for message in loop_messages %}\n'
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_head"
        "er_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\n"
        '{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% end'
        'if %}\n'
        '{{ content }}\n'
        '{% endfor %}\n'
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_he"
        "ader_id|>\\n\\n' }}{% endif %}\n"
    ),
    'mistral': (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        '    {%- set loop_messages = messages[1:] %}\n'
        '{%- else %}\n'
        '    {%- set loop_messages = messages %}\n'
        '{%- endif %}\n'
        '\n'
        '{{- bos_token }}\n'
        '{%- for message in loop_messages %}\n'
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conver"
        "sation roles must alternate user/assistant/user/assistant/...') }}\n"
        '    {%- endif %}\n'
        "    {%- if message['role'] == 'user' %}\n"
        '        {%- if loop.first and system_message is defined %}\n'
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['conten"
        "t'] + ' [/INST]' }}\n"
        '        {%- else %}\n'
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        '        {%- endif %}\n'
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n"
        '    {%- else %}\n'
        "        {{- raise_exception('Only user and assistant roles are support"
        "ed, with the exception of an initial optional system message!') }}\n"
        '    {%- endif %}\n'
        '{%- endfor %}\n'
    ),
}
