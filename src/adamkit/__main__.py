"""``python -m adamkit``: the same as the ``adamkit`` command."""

from adamkit.cli import main

raise SystemExit(main())
