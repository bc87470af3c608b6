"""Command lines: ``kdn`` (``main``: serve, bench), ``kdnctl`` (``ctl``) and the subcommands it mounts (``codec``,
``warm``, and the cost calculator from :mod:`costmodel.cli`)."""
