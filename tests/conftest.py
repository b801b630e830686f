"""Suite-wide fixtures. `mta_world` comes from mta.testing's pytest plugin (issue 16); it is imported here
as well because an editable install made before the `pytest11` entry point existed does not load it."""

from mta.testing.plugin import mta_world  # noqa: F401
