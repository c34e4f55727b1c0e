"""Subcommands of the ``jaxarith`` CLI, one module each (discovered by ``jaxarith.cli``)."""
