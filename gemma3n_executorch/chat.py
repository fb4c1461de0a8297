"""How chat turns become text: the checkpoint's own chat template when it ships one, rendered by
transformers, else Gemma's rules written out (what the template does).

Gemma's rules: the text starts with ``<bos>``; each turn is
``<start_of_turn>{user|model}\\n{content, trimmed}<end_of_turn>\\n``; a system message is not a
turn of its own but is put, followed by a blank line, before the first user message; roles
alternate user/model; a generation prompt is ``<start_of_turn>model\\n``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .progress import UserError

# The chat template of Gemma's instruction-tuned checkpoints (tokenizer_config.json), text turns
# only: the tiny tokenizer ships it, and the fallback below is checked against it.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
BOS = "<bos>"
# Stand-ins for an earlier exchange, to learn from the template what a later turn adds.
_EARLIER_USER, _EARLIER_REPLY = "earlier question", "earlier reply"


def checkpoint_chat_template(directory: Path) -> str | None:
    """The template a checkpoint ships: chat_template.jinja, or tokenizer_config.json's
    chat_template (a string, or a list of named templates of which "default" is the one)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def gemma_rules(messages: list[dict], add_generation_prompt: bool) -> str:
    """What GEMMA_CHAT_TEMPLATE renders, for checkpoints that ship no template."""
    prefix, turns = "", messages
    if messages and messages[0]["role"] == "system":
        prefix, turns = messages[0]["content"] + "\n\n", messages[1:]
    text = BOS
    for index, message in enumerate(turns):
        if (message["role"] == "user") != (index % 2 == 0):
            raise UserError("chat roles must alternate user/assistant")
        role = "model" if message["role"] == "assistant" else message["role"]
        text += f"<start_of_turn>{role}\n{prefix if index == 0 else ''}{message['content'].strip()}<end_of_turn>\n"
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


class ChatFormat:
    """Renders a conversation with ``template`` (None: Gemma's rules)."""

    def __init__(self, template: str | None):
        self.template = template

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.template is None:
            return gemma_rules(messages, add_generation_prompt)
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.template, bos_token=BOS,
                                                eos_token="<eos>", add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja raises its own types, and the template raise_exception's
            raise UserError(f"the checkpoint's chat template failed ({error})") from None
        return rendered[0]

    def first_turn(self, text: str, system: str | None = None) -> str:
        """The whole text of a conversation's first turn, up to the model's reply."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.render(messages, add_generation_prompt=True)

    def next_turn(self, text: str) -> tuple[str, str]:
        """What closes the model's previous reply, and what a later user turn adds after it."""
        earlier = [{"role": "user", "content": _EARLIER_USER}, {"role": "assistant", "content": _EARLIER_REPLY}]
        before = self.render(earlier, add_generation_prompt=False)
        after = self.render(earlier + [{"role": "user", "content": text}], add_generation_prompt=True)
        if not after.startswith(before):
            raise UserError("the checkpoint's chat template re-renders earlier turns; use --no-chat-template")
        return before[before.rindex(_EARLIER_REPLY) + len(_EARLIER_REPLY):], after[len(before):]
