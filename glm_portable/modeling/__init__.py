"""Native ChatGLM2/3: config, model, tokenizer, prompts, checkpoint I/O and chat helpers."""

from .chat import GenerationSettings, chat, stream_chat
from .config import ChatGLMConfig, load_config
from .loading import load_model, load_prefix, load_tokenizer, random_model, resolve_dtype, save_model, save_prefix
from .model import ChatGLMForConditionalGeneration
from .prompts import chat_input_ids, chatglm2_prompt, chatglm3_ids
from .tokenizer import ChatGLMTokenizer

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMTokenizer",
    "GenerationSettings",
    "chat",
    "chat_input_ids",
    "chatglm2_prompt",
    "chatglm3_ids",
    "load_config",
    "load_model",
    "load_prefix",
    "load_tokenizer",
    "random_model",
    "resolve_dtype",
    "save_model",
    "save_prefix",
    "stream_chat",
]
