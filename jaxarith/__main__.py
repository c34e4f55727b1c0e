from jaxarith.cli import entry

entry()
