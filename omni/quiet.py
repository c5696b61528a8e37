"""A logging filter for one known-harmless transformers warning about Qwen2.5-Omni configs.

Installed by the code that builds or loads such a config (the rollout engine, the learner rank,
``omni.inputs.load_processor``, ``omni.fixtures.tiny``), in that process only and never at import: importing
``omni`` must not change how a host program logs.
"""

from __future__ import annotations

import logging

_LOGGER = "transformers.configuration_utils"
_MESSAGE = "integer within the vocabulary (between 0 and 8447)"


class _DefaultTalkerFilter(logging.Filter):
    """transformers 5 builds a *default* talker config whenever it serialises or loads a
    Qwen2.5-Omni config and then warns that the default's own token ids lie outside the default's
    8,448-token vocabulary. The warning is about transformers' defaults, not the checkpoint at hand;
    this drops exactly that one (any other vocabulary size still warns)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _MESSAGE not in record.getMessage()


def quiet_default_talker_warnings() -> None:
    """Drop the default-talker vocabulary warning in this process (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DefaultTalkerFilter) for f in logger.filters):
        logger.addFilter(_DefaultTalkerFilter())
