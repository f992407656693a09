"""kdns: the cluster DNS server (the folder is dns/, the import package is kdns)."""
__version__ = "0.1.0"
