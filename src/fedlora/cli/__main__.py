"""``python -m fedlora.cli``: the ``fedlora`` command."""

from fedlora.cli.commands import main

raise SystemExit(main())
