"""kproxy: a kube-proxy reimplementation with Cython hot paths."""
__version__ = "0.1.0"
