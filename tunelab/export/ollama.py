"""An Ollama Modelfile for an exported GGUF file: `ollama create NAME -f model.Modelfile`.

Ollama does not read the GGUF's Jinja chat template; it needs its own Go template, stop tokens and
default system message. Translating Jinja in general is out of reach, so the tokenizer's template is
*recognised*: rendered on probe conversations and compared with ChatML (`<|im_start|>role\\ncontent
<|im_end|>\\n` ..., SmolLM2's and tunelab's default). A ChatML template, with or without a default
system message inserted when the conversation has none, becomes Ollama's ChatML template, `SYSTEM` and
the stop tokens (`<|im_end|>`, and the eos token when it differs); any other template is refused with
what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.export import ExportError

START, END = "<|im_start|>", "<|im_end|>"
CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}" + START + "{{ .Role }}\n{{ .Content }}" + END + "\n{{ end }}" + START + "assistant\n"
)
_PROBE = [
    {"role": "system", "content": "SYSTEM-1"},
    {"role": "user", "content": "USER-1"},
    {"role": "assistant", "content": "ASSISTANT-1"},
    {"role": "user", "content": "USER-2"},
]


def _chatml(messages: list[dict]) -> str:
    return "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages) + f"{START}assistant\n"


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def modelfile_text(tokenizer, gguf_name: str) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder) with `tokenizer`'s chat template."""
    if not tokenizer.chat_template:
        raise ExportError("the tokenizer has no chat template, so there is nothing to give Ollama")
    why = (
        "an Ollama Modelfile is written only for ChatML chat templates (<|im_start|>role ... <|im_end|>); "
        "this tokenizer's template renders conversations differently. Write the Modelfile's TEMPLATE by hand "
        "(https://github.com/ollama/ollama/blob/main/docs/template.md) or export without --modelfile."
    )
    try:
        with_system, without = _render(tokenizer, _PROBE), _render(tokenizer, _PROBE[1:])
    except Exception as e:  # a template that refuses the probe (e.g. no system role) is not ChatML
        raise ExportError(f"{why} (rendering a probe conversation failed: {e})") from e
    if with_system != _chatml(_PROBE):
        raise ExportError(why)
    default_system = None
    if without != _chatml(_PROBE[1:]):
        head = without[: len(without) - len(_chatml(_PROBE[1:]))]
        match = re.fullmatch(re.escape(f"{START}system\n") + r"(.*)" + re.escape(f"{END}\n"), head, re.S)
        if not without.endswith(_chatml(_PROBE[1:])) or match is None:
            raise ExportError(why)
        default_system = match.group(1)
    stops = [END] + ([tokenizer.eos_token] if tokenizer.eos_token and tokenizer.eos_token != END else [])
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML_GO_TEMPLATE}"""']
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
