"""Native ChatGLM-6B and ChatGLM2/3: config, model, tokenizer, prompts, checkpoint I/O and chat helpers."""

from .architectures import new_model
from .chat import GenerationSettings, chat, stream_chat
from .config import ChatGLM1Config, ChatGLMConfig, load_config
from .loading import load_model, load_prefix, load_tokenizer, random_model, resolve_dtype, save_model, save_prefix
from .model import ChatGLMForConditionalGeneration
from .model_v1 import ChatGLM1ForConditionalGeneration
from .prompts import chat_input_ids, chatglm2_prompt, chatglm3_ids
from .tokenizer import ChatGLMTokenizer
from .tokenizer_v1 import ChatGLM1Tokenizer

__all__ = [
    "ChatGLM1Config",
    "ChatGLM1ForConditionalGeneration",
    "ChatGLM1Tokenizer",
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMTokenizer",
    "GenerationSettings",
    "chat",
    "chat_input_ids",
    "chatglm2_prompt",
    "chatglm3_ids",
    "load_config",
    "new_model",
    "load_model",
    "load_prefix",
    "load_tokenizer",
    "random_model",
    "resolve_dtype",
    "save_model",
    "save_prefix",
    "stream_chat",
]
