"""CLI commands, one module per verb (see ``steerscale.cli``)."""
