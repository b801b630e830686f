"""`python -m mta` runs the command-line interface."""

from mta.cli import main

raise SystemExit(main())
