"""The jaxarith training program: ``python -m train CONFIG.yaml [key=value ...]``."""
