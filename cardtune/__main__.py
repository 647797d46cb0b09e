"""``python -m cardtune`` is the ``cardtune`` command."""

from cardtune.cli import main

raise SystemExit(main())
