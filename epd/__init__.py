"""EPD: disaggregated encode / prefill / decode serving for vision-language models."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from epd.engine.engine import Engine


def __getattr__(name: str):
    if name == "Engine":  # imported lazily: `import epd` stays cheap for the CLI and the nodes
        from epd.engine.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "__version__"]
