"""Prompt templates. The same template renders prompts at train and at generate time."""

from __future__ import annotations

from dataclasses import dataclass

from zerotune.errors import ConfigError

TEMPLATE_NAMES = ("alpaca", "alpaca_es", "chat", "tokens")


@dataclass(frozen=True)
class AlpacaTemplate:
    """An Alpaca-style prompt: preamble, instruction, optional input, then the response header."""

    name: str
    preamble_with_input: str
    preamble_without_input: str
    instruction_header: str
    input_header: str
    response_header: str

    def render_prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return (
                f"{self.preamble_with_input}\n\n{self.instruction_header}\n{instruction}\n\n"
                f"{self.input_header}\n{input}\n\n{self.response_header}\n"
            )
        return f"{self.preamble_without_input}\n\n{self.instruction_header}\n{instruction}\n\n{self.response_header}\n"


ALPACA = AlpacaTemplate(
    name="alpaca",
    preamble_with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
    ),
    preamble_without_input=(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    ),
    instruction_header="### Instruction:",
    input_header="### Input:",
    response_header="### Response:",
)

ALPACA_ES = AlpacaTemplate(
    name="alpaca_es",
    preamble_with_input=(
        "A continuación hay una instrucción que describe una tarea, junto con una entrada que proporciona más "
        "contexto. Escribe una respuesta que complete adecuadamente la petición."
    ),
    preamble_without_input=(
        "A continuación hay una instrucción que describe una tarea. "
        "Escribe una respuesta que complete adecuadamente la petición."
    ),
    instruction_header="### Instrucción:",
    input_header="### Entrada:",
    response_header="### Respuesta:",
)

ALPACA_TEMPLATES = {"alpaca": ALPACA, "alpaca_es": ALPACA_ES}


def get_alpaca_template(name: str) -> AlpacaTemplate:
    if name not in ALPACA_TEMPLATES:
        raise ConfigError(f"unknown template {name!r}: choose one of {', '.join(TEMPLATE_NAMES)} or auto")
    return ALPACA_TEMPLATES[name]


def check_template_name(name: str) -> None:
    if name not in TEMPLATE_NAMES and name != "auto":
        raise ConfigError(f"unknown template {name!r}: choose one of {', '.join(TEMPLATE_NAMES)} or auto")


def template_for_record(record: dict, configured: str) -> str:
    """The template one record uses. With 'auto': tokens for pre-tokenized 'input_ids' records, chat for
    'messages' or ShareGPT 'conversations' records, alpaca_es for records marked "lang": "es", else alpaca."""
    if configured != "auto":
        return configured
    if "input_ids" in record:
        return "tokens"
    if "messages" in record or "conversations" in record:  # OpenAI-style messages, or ShareGPT turns
        return "chat"
    return "alpaca_es" if record.get("lang") == "es" else "alpaca"
