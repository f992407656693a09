# cython: language_level=3
"""Compiled hot paths of kproxy. Every function has a twin in kproxy/_purepath.py."""
from hashlib import sha256
from base64 import b32encode


cpdef str port_proto_hash(str service_port_name, str protocol):
    cdef bytes digest = sha256((service_port_name + protocol).encode()).digest()
    return b32encode(digest)[:16].decode("ascii")
