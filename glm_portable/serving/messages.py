"""OpenAI chat messages to a ChatGLM prompt, in the model directory's family format.

ChatGLM3 has role tokens for every OpenAI role (``tool`` results are its ``observation`` turns).
ChatGLM2 knows only user and assistant rounds: a system message is put before the first question,
as its users do by hand.
"""

from __future__ import annotations

from typing import Any, Sequence

from glm_portable.modeling import ChatGLMTokenizer, chat_input_ids
from glm_portable.modeling.prompts import chatglm3_ids

ROLES = ("system", "user", "assistant", "tool", "observation")
_CHATGLM3_ROLE = {"tool": "observation"}


class MessageError(ValueError):
    """A request whose messages cannot form a prompt; ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def message_text(content: Any, param: str) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise MessageError("only text content parts are supported", f"{param}.{index}")
        texts.append(part["text"])
    return "".join(texts)


def prompt_ids(tokenizer: ChatGLMTokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The model input for answering the last message, given the ones before it."""
    if not messages:
        raise MessageError("messages must hold at least one message", "messages")
    turns = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise MessageError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}", f"messages.{index}.role")
        turns.append({"role": role, "content": message_text(message.get("content"), f"messages.{index}.content")})
    last = turns[-1]
    if last["role"] == "assistant" or last["role"] == "system":
        raise MessageError("the last message must be the user's (or a tool result) for the model to answer",
                           f"messages.{len(turns) - 1}.role")
    if tokenizer.family == "chatglm3":
        history = [{**t, "role": _CHATGLM3_ROLE.get(t["role"], t["role"])} for t in turns[:-1]]
        return chatglm3_ids(tokenizer, last["content"], history, role=_CHATGLM3_ROLE.get(last["role"], last["role"]))
    for index, turn in enumerate(turns):
        if turn["role"] in ("tool", "observation"):
            raise MessageError(f"{tokenizer.family} has no {turn['role']} role", f"messages.{index}.role")
    system = "\n".join(t["content"] for t in turns if t["role"] == "system" and t["content"])
    dialogue = [t for t in turns if t["role"] != "system"]
    if system:
        first_user = next(i for i, t in enumerate(dialogue) if t["role"] == "user")
        dialogue[first_user] = {**dialogue[first_user], "content": f"{system}\n{dialogue[first_user]['content']}"}
    return chat_input_ids(tokenizer, dialogue[-1]["content"], dialogue[:-1])
