"""``python -m fedcore.cli`` runs the ``fedcore`` command."""

from fedcore.cli import main

raise SystemExit(main())
