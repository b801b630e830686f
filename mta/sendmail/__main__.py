"""`python -m mta.sendmail [flags] [rcpt...]`: the bare `sendmail` command (config from MTA_CONFIG)."""

from mta.sendmail.main import script_main

raise SystemExit(script_main())
