"""Native ChatGLM-6B and ChatGLM2/3: config, model, tokenizer, prompts, checkpoint I/O and chat helpers.

Names are loaded on first use (``glm_portable.lazy``), so that reading ``modeling.options`` (the CLI
does, to build its flags) imports no torch.
"""

from glm_portable.lazy import lazy_exports

_WHERE = {
    "new_model": "architectures",
    "GenerationSettings": "dialogue", "chat": "dialogue", "stream_chat": "dialogue",
    "ChatGLM1Config": "config", "ChatGLMConfig": "config", "load_config": "config",
    "load_model": "loading", "load_prefix": "loading", "load_tokenizer": "loading", "random_model": "loading",
    "resolve_dtype": "loading", "save_model": "loading", "save_prefix": "loading",
    "ChatGLMForConditionalGeneration": "model", "ChatGLM1ForConditionalGeneration": "model_v1",
    "chat_input_ids": "prompts", "chatglm2_prompt": "prompts", "chatglm3_ids": "prompts",
    "ChatGLMTokenizer": "tokenizer", "ChatGLM1Tokenizer": "tokenizer_v1",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
