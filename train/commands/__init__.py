"""Subcommands of ``jaxarith`` that run the training program (registered as entry points in
pyproject.toml's ``jaxarith.commands`` group, so the library needs no import of ``train``)."""
