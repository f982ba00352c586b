"""Benchmark harness for OpenAI-compatible chat servers (EPD, vLLM, SGLang, ...).

Lifecycle: ``cli.main`` parses options into ``config.BenchConfig``; ``datasets`` builds the
requests; ``runner`` sends them on the ``arrivals`` schedule through ``client`` (streamed
SSE, timed per token); ``metrics`` reduces the outputs; ``report`` prints and writes JSON;
``plots`` draws PNGs. See ``bench/README.md`` for usage.
"""
