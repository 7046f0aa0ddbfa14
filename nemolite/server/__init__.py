"""The HTTP server: one app, one module per protocol (NeMo, OpenAI, Triton/KServe v2)."""
