"""Sources of GPU capacity, one module each, behind the small protocol in ``providers.base``."""
