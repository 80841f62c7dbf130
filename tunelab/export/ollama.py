"""An Ollama Modelfile for an exported GGUF file: `ollama create NAME -f model.Modelfile`.

Ollama does not read the GGUF's Jinja chat template; it needs its own Go template, stop tokens and
default system message. Translating Jinja in general is out of reach, so the tokenizer's template is
*recognised*: rendered on probe conversations and compared with the formats below, each a Python renderer
beside the Go template that renders the same text (tests/test_export.py runs both through Go's text/template,
the engine Ollama's templates run in):

  - ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`; SmolLM2's, Qwen's and tunelab's default),
  - Phi-3's (`<|role|>\\ncontent<|end|>\\n`) and Zephyr's (`<|role|>\\ncontent</s>\\n`: TinyLlama chat),
  - Gemma's (`<start_of_turn>user\\n ... <end_of_turn>\\n`, the assistant called `model`, a system message put
    before the first user message; the leading <bos> is llama.cpp's to add),
  - Mistral Instruct's (`[INST] ... [/INST]reply</s>`, v0.1 / v0.2: no system role, which it refuses; the
    Modelfile's template leaves system messages out),
  - Llama 3 Instruct's (`<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`),
  - Llama 3.1 / 3.2 / 3.3 Instruct's: Llama 3's turns after a system turn every prompt opens with, the model's
    knowledge cutoff and a date before the system message, if any (`Cutting Knowledge Date: December 2023\\nToday
    Date: 26 Jul 2024\\n\\n`). The date is read off the probe's rendering and written into the Go template as it
    is: 3.1's is fixed, 3.2's the day the template is rendered (here the export's day, as training rendered its
    own day). Tool definitions and calls are not carried over (the probe has none),
  - Llama 2 Chat's (`<s>[INST] <<SYS>> ... <</SYS>> ... [/INST] reply </s>`, a <s> before each later user turn).

A template that also inserts a default system message when the conversation has none gives the Modelfile's
`SYSTEM`; the stop tokens are the end of turn, and the eos token when it differs. Any other template is
refused with what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.export import ExportError


@dataclass(frozen=True)
class ChatFormat:
    name: str
    render: Callable[[list[dict]], str]  # a conversation, then the assistant's turn opened
    go_template: str
    end_of_turn: str
    system_turn: Callable[[str], str] | None  # a system message's own turn (None: it has none)
    takes_system: bool = True  # False: the chat template refuses a system message


def _tagged(start: Callable[[str], str], end: str) -> Callable[[list[dict]], str]:
    return lambda messages: "".join(f"{start(m['role'])}{m['content']}{end}" for m in messages) + start("assistant")


def _llama2(messages: list[dict]) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    out = ""
    for i, m in enumerate(messages[1:] if system is not None else messages):
        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}" if i == 0 and system is not None else m["content"]
        if m["role"] == "user":
            out += f"{'<s>' if i else ''}[INST] {content} [/INST]"
        else:
            out += f" {content} </s>"
    return out


def _gemma(messages: list[dict]) -> str:
    system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    out = ""
    for i, m in enumerate(turns):
        role = "model" if m["role"] == "assistant" else m["role"]
        out += f"<start_of_turn>{role}\n{system if i == 0 else ''}{m['content']}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
FORMATS = [
    ChatFormat("ChatML", _tagged(lambda r: f"<|im_start|>{r}\n", "<|im_end|>\n"), CHATML_GO_TEMPLATE, "<|im_end|>",
               lambda s: f"<|im_start|>system\n{s}<|im_end|>\n"),
    ChatFormat("Phi-3", _tagged(lambda r: f"<|{r}|>\n", "<|end|>\n"),
               "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n", "<|end|>",
               lambda s: f"<|system|>\n{s}<|end|>\n"),
    ChatFormat("Zephyr", _tagged(lambda r: f"<|{r}|>\n", "</s>\n"),
               "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n", "</s>",
               lambda s: f"<|system|>\n{s}</s>\n"),
    ChatFormat("Gemma", _gemma,
               '{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}'
               "{{ end }}{{- $first := true }}{{- range .Messages }}{{- if eq .Role \"user\" }}<start_of_turn>user\n"
               '{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}'
               '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
               "{{ $first = false }}{{- end }}{{- end }}<start_of_turn>model\n", "<end_of_turn>", None),
    ChatFormat("Llama 3", _tagged(lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>"),
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
               lambda s: f"<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>"),
    ChatFormat("Llama 2", _llama2,
               '{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}'
               '{{ end }}{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }}{{ if not $first }}<s>'
               "{{ end }}[INST] {{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}{{ .Content }}"
               ' [/INST]{{ $first = false }}{{- else if eq .Role "assistant" }} {{ .Content }} </s>{{ $first = false }}'
               "{{- end }}{{- end }}", "</s>", None),
    ChatFormat("Mistral", lambda ms: "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else
                                             f"{m['content']}</s>" for m in ms if m["role"] != "system"),
               '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
               '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}', "</s>", None, False),
]  # fmt: skip
_LLAMA3_TURN = "<|start_header_id|>{}<|end_header_id|>\n\n"
_DATED = re.compile(
    re.escape(_LLAMA3_TURN.format("system")) + r"(Cutting Knowledge Date: [^\n{}]*\nToday Date: [^\n{}]*\n\n)"
)


def _llama31(dated: str) -> ChatFormat:
    """Llama 3.1+ Instruct's format with the system turn's `dated` opening (module doc)."""

    def render(messages: list[dict]) -> str:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        rest = messages[1:] if system is not None else messages
        head = _LLAMA3_TURN.format("system") + dated + (system or "") + "<|eot_id|>"
        return head + "".join(f"{_LLAMA3_TURN.format(m['role'])}{m['content']}<|eot_id|>" for m in rest) + (
            _LLAMA3_TURN.format("assistant"))  # fmt: skip

    go = (_LLAMA3_TURN.format("system") + dated  # no `{{-` after it: that would trim the date's two line breaks
          + '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}{{ end }}{{ end }}<|eot_id|>'
          '{{ range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
          "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip
    turn = _LLAMA3_TURN.format("system") + dated
    return ChatFormat("Llama 3.1+", render, go, "<|eot_id|>", lambda s: f"{turn}{s}<|eot_id|>")


_PROBE = [
    {"role": "system", "content": "SYSTEM-1"},
    {"role": "user", "content": "USER-1"},
    {"role": "assistant", "content": "ASSISTANT-1"},
    {"role": "user", "content": "USER-2"},
]


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _without_bos(text: str, bos: str | None) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text  # llama.cpp adds the bos itself


def recognise(tokenizer) -> tuple[ChatFormat, str | None]:
    """(the format the tokenizer's chat template renders, its default system message or None); ExportError if
    it is none of FORMATS."""
    if not tokenizer.chat_template:
        raise ExportError("the tokenizer has no chat template, so there is nothing to give Ollama")
    names = [f.name for f in FORMATS]
    names.insert(names.index("Llama 3") + 1, "Llama 3.1+")
    why = (
        f"an Ollama Modelfile is written only for the {', '.join(names)} chat templates; this "
        "tokenizer's template renders conversations differently. Write the Modelfile's TEMPLATE by hand "
        "(https://github.com/ollama/ollama/blob/main/docs/template.md) or export without --modelfile."
    )
    try:
        without_system = _render(tokenizer, _PROBE[1:])
    except Exception as e:  # a template that refuses the probe is none of them
        raise ExportError(f"{why} (rendering a probe conversation failed: {e})") from e
    try:
        rendered = _render(tokenizer, _PROBE), without_system
    except Exception:  # a template without a system role (Mistral Instruct's raises)
        rendered = None, without_system
    # as rendered, or less a bos token the template writes first (Gemma's; ChatML's tiny test tokenizer has
    # <|im_start|> for its bos, which ChatML text starts with and keeps)
    variants = [rendered, tuple(t and _without_bos(t, tokenizer.bos_token) for t in rendered)]
    dated = _DATED.match(variants[1][1])  # Llama 3.1+: its date as the template writes it
    for fmt in FORMATS + ([_llama31(dated.group(1))] if dated else []):
        if not fmt.takes_system:  # recognised without a system message, and only where the template refuses one
            if rendered[0] is None and any(v[1] == fmt.render(_PROBE[1:]) for v in variants):
                return fmt, None
            continue
        with_system, without = next((v for v in variants if v[0] == fmt.render(_PROBE)), (None, None))
        if with_system is None:
            continue
        if without == fmt.render(_PROBE[1:]):
            return fmt, None
        head = without[: len(without) - len(fmt.render(_PROBE[1:]))]
        if fmt.system_turn is not None and without.endswith(fmt.render(_PROBE[1:])):
            before, _, after = fmt.system_turn("\x00").partition("\x00")
            match = re.fullmatch(re.escape(before) + r"(.*)" + re.escape(after), head, re.S)
            if match is not None:
                return fmt, match.group(1)
    raise ExportError(why)


def modelfile_text(tokenizer, gguf_name: str) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder) with `tokenizer`'s chat template."""
    fmt, default_system = recognise(tokenizer)
    eos = tokenizer.eos_token
    stops = [fmt.end_of_turn] + ([eos] if eos and eos != fmt.end_of_turn else [])
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{fmt.go_template}"""']
    if default_system is not None:
        if '"""' in default_system:
            raise ExportError('the default system message contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{default_system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(tokenizer, gguf_path) -> Path:
    """Write `<gguf stem>.Modelfile` beside `gguf_path` and return its path."""
    gguf_path = Path(gguf_path)
    out = gguf_path.with_suffix(".Modelfile")
    out.write_text(modelfile_text(tokenizer, gguf_path.name))
    return out
