"""Sub-commands of ``cardtune``; each module registers its own with :func:`cardtune.cli.command`.

Modules here import only the standard library, pydantic and yaml at import time: heavy
imports (torch, transformers) happen inside the handlers.
"""

from cardtune.commands import cards  # noqa: F401, I001  (registration order is the help order)
from cardtune.commands import labels  # noqa: F401
from cardtune.commands import validate_data  # noqa: F401
from cardtune.commands import chat  # noqa: F401
from cardtune.commands import merge  # noqa: F401
from cardtune.commands import add_model  # noqa: F401
from cardtune.commands import eval  # noqa: F401
from cardtune.commands import report  # noqa: F401
