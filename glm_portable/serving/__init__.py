"""Serving a tuned model: the batched generation engine, the OpenAI-compatible API and chat page, export."""
