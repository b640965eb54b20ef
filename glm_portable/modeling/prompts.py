"""Prompt layouts of ChatGLM-6B and ChatGLM2 (rounds) and ChatGLM3 (role tokens), from a list of messages.

History is a list of ``{"role": ..., "content": ...}`` messages for both families, so callers
need not know which one a model directory holds.
"""

from __future__ import annotations

import json
from typing import Sequence

from glm_portable.errors import UserError

from .tokenizer import ChatGLMTokenizer

Message = dict


def chatglm2_prompt(query: str, history: Sequence[Message] = ()) -> str:
    """``[Round i]\\n\\n问：q\\n\\n答：a\\n\\n`` per past turn, then the open round for ``query``."""
    prompt = ""
    for i, (user, assistant) in enumerate(_rounds(history), 1):
        prompt += f"[Round {i}]\n\n问：{user}\n\n答：{assistant}\n\n"
    return prompt + f"[Round {len(_rounds(history)) + 1}]\n\n问：{query}\n\n答："


def chatglm1_prompt(query: str, history: Sequence[Message] = (), rounds: bool = False) -> str:
    """ChatGLM-6B: ``[Round i]\n问：q\n答：a\n`` per past turn counting from 0, then the open round; with no
    history the bare query, unless ``rounds`` asks for the round form anyway (THUDM's main.py with a history column)."""
    pairs = _rounds(history)
    if not pairs and not rounds:
        return query
    prompt = "".join(f"[Round {i}]\n问：{user}\n答：{assistant}\n" for i, (user, assistant) in enumerate(pairs))
    return prompt + f"[Round {len(pairs)}]\n问：{query}\n答："


def _rounds(history: Sequence[Message]) -> list[tuple[str, str]]:
    """Pair user and assistant messages; ChatGLM-6B and ChatGLM2 have no other roles."""
    rounds, pending = [], None
    for message in history:
        role, content = message.get("role"), message.get("content", "")
        if role == "user":
            pending = content
        elif role == "assistant" and pending is not None:
            rounds.append((pending, content))
            pending = None
        elif role not in ("user", "assistant", "system"):
            raise UserError(f"ChatGLM-6B and ChatGLM2 prompts have no role {role!r}")
    return rounds


def chatglm3_ids(tokenizer: ChatGLMTokenizer, query: str, history: Sequence[Message] = (), role: str = "user") -> list[int]:
    """``[gMASK] sop``, each message as role token + metadata line + content, the query, then ``<|assistant|>``."""
    ids = list(tokenizer.prefix_ids)
    for message in history:
        content = message.get("content", "")
        if message.get("role") == "system" and message.get("tools"):
            content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids += tokenizer.role_message_ids(message.get("role", "user"), content, message.get("metadata", ""))
    ids += tokenizer.role_message_ids(role, query)
    return ids + [tokenizer.get_command("<|assistant|>")]


def chat_input_ids(tokenizer: ChatGLMTokenizer, query: str, history: Sequence[Message] = ()) -> list[int]:
    """The model input for one chat turn in the tokenizer's family format."""
    if tokenizer.family == "chatglm3":
        return chatglm3_ids(tokenizer, query, history)
    if tokenizer.family == "chatglm":
        return tokenizer.encode(chatglm1_prompt(query, history))
    return tokenizer.encode(chatglm2_prompt(query, history))
