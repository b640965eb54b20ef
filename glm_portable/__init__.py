"""glm-portable: fine-tune ChatGLM models on CUDA GPUs, Ascend NPUs or CPUs with the same commands."""

__version__ = "0.1.0"
