"""The chat formats medtune knows, in one table: how a turn is written (its markers, the role's place, the reply's
role name, whether a system text is folded into the first user turn), the token that ends a turn, the tokens a
generation stops on, and the Jinja template a config can name (`base.chat_template`).

Every module that needs a format's facts reads them here: the tokenizer's end-of-turn and stop tokens (models), the
named templates (chat_templates), the Ollama Modelfile's Go template and stop list (export/ollama), the tokenizer
parity texts (export/parity).
"""

from __future__ import annotations

from dataclasses import dataclass

# ChatML as SmolLM2 and Qwen write it, without a default system prompt.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3's turns (as Llama-3-Instruct writes them; without 3.2's "Cutting Knowledge Date" system block).
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Gemma's turns (google/gemma-3-*-it): no system role, a system text is folded into the first user turn; the
# assistant's role is called `model`; message text is trimmed.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    name: str  # a `base.chat_template` name when `template` is set
    title: str  # as people call it
    end_of_turn: str  # the token that closes a turn, and so a reply
    # A turn is `turn_start + role + role_end + content + end_of_turn + after_turn`. None: the format is known by its
    # end-of-turn token only (no template to offer, no Modelfile to write).
    turn_start: str | None
    role_end: str
    after_turn: str
    more_stops: tuple[str, ...] = ()  # other tokens a generation stops on (Llama 3 lists three in its config)
    template: str | None = None  # the Jinja text `base.chat_template: <name>` sets
    reply_role: str = "assistant"  # the role name the template writes for the assistant's turns
    fold_system: bool = False  # no system turn: the system text opens the first user turn

    @property
    def turn_end(self) -> str:
        """What the template writes after a turn's content."""
        return self.end_of_turn + self.after_turn

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.end_of_turn, *self.more_stops)

    @property
    def markers(self) -> tuple[str, ...]:
        """The special tokens the template writes; each must be one token of the vocabulary (Llama 3's role_end
        holds one, `<|end_header_id|>`)."""
        return tuple(t for t in (self.turn_start, self.role_end.strip(), self.end_of_turn) if t)


# Most specific end-of-turn token first: a vocabulary holding several ends turns with the first its template writes.
FORMATS = (
    ChatFormat("llama3", "Llama 3", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>\n\n", "",
               more_stops=("<|eom_id|>", "<|end_of_text|>"), template=LLAMA3),
    ChatFormat("chatml", "ChatML", "<|im_end|>", "<|im_start|>", "\n", "\n", template=CHATML),
    ChatFormat("phi3", "Phi-3", "<|end|>", None, "", ""),
    ChatFormat("gemma", "Gemma", "<end_of_turn>", "<start_of_turn>", "\n", "\n", template=GEMMA, reply_role="model",
               fold_system=True),
)
BY_NAME = {f.name: f for f in FORMATS}
NAMED_TEMPLATES = {f.name: f for f in FORMATS if f.template is not None}  # what `base.chat_template` may name
TURN_FORMATS = tuple(f for f in FORMATS if f.turn_start is not None)  # those an Ollama template can be built for

END_OF_TURN_TOKENS = tuple(f.end_of_turn for f in FORMATS)
STOP_TOKENS = tuple(t for f in FORMATS for t in f.stops)  # every id a generation may stop on
# Markers of other families and document boundaries: the tokenizer parity check writes them as text too.
OTHER_MARKERS = ("<|begin_of_text|>", "<|endoftext|>", "<s>", "</s>", "[INST]")
ALL_MARKERS = tuple(dict.fromkeys([*(t for f in FORMATS for t in f.markers), *OTHER_MARKERS]))
