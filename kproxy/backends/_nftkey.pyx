# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The bytes of an nftables set element's key or data for its common text forms, in C: a full
sync has 200,000 of them. kproxy.backends.nftnl._key is the pure-Python path and the meaning:
this returns None for anything it does not parse itself (IPv6, errors, unusual spellings), and
nftnl then takes that path, so both give the same bytes (tests/nftables/test_nftables_encode_twins.py).

Parts of a concatenation ("A . B . C"), each padded to a 32-bit register:
  - an IPv4 dotted quad (four decimal numbers 0-255, no leading zeros): 4 bytes, network order;
  - 0xHEX (numgen's slot index, at most 8 hex digits, lowercase): 4 bytes, host order;
  - tcp, udp, sctp: the protocol number, then 3 zero bytes;
  - a decimal port 0-65535 (at most 5 digits): 2 bytes network order, then 2 zero bytes.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef enum:
    MAX_PARTS = 4


cdef inline int _part(const uint8_t* s, Py_ssize_t n, uint8_t* out) noexcept:
    """Writes one part's 4 bytes; 0 if the part is not one of the forms above."""
    cdef Py_ssize_t i
    cdef uint32_t v, octet
    cdef int digits, dots
    cdef uint8_t c
    if n == 0:
        return 0
    if n > 2 and s[0] == 48 and s[1] == 120:  # "0x"
        if n > 10:
            return 0
        v = 0
        for i in range(2, n):
            c = s[i]
            if 48 <= c <= 57:
                v = (v << 4) | (c - 48)
            elif 97 <= c <= 102:
                v = (v << 4) | (c - 87)
            else:
                return 0
        (<uint32_t*>out)[0] = v  # host order, as struct "=I"
        return 1
    if s[0] >= 48 and s[0] <= 57:
        # a dotted quad or a port
        dots = 0
        for i in range(n):
            if s[i] == 46:
                dots += 1
        if dots == 0:
            if n > 5:
                return 0
            v = 0
            for i in range(n):
                c = s[i]
                if c < 48 or c > 57:
                    return 0
                v = v * 10 + (c - 48)
            if v > 65535:
                return 0
            out[0] = v >> 8
            out[1] = v & 255
            out[2] = 0
            out[3] = 0
            return 1
        if dots != 3:
            return 0
        octet = 0
        digits = 0
        dots = 0
        for i in range(n + 1):
            c = s[i] if i < n else 46
            if c == 46:
                if digits == 0 or octet > 255:
                    return 0
                out[dots] = octet
                dots += 1
                octet = 0
                digits = 0
            elif 48 <= c <= 57:
                if digits > 0 and octet == 0:  # a leading zero: left to inet_pton's rules
                    return 0
                octet = octet * 10 + (c - 48)
                digits += 1
                if digits > 3:
                    return 0
            else:
                return 0
        return 1
    if n == 3 and s[0] == 116 and s[1] == 99 and s[2] == 112:  # tcp
        v = 6
    elif n == 3 and s[0] == 117 and s[1] == 100 and s[2] == 112:  # udp
        v = 17
    elif n == 4 and s[0] == 115 and s[1] == 99 and s[2] == 116 and s[3] == 112:  # sctp
        v = 132
    else:
        return 0
    out[0] = v
    out[1] = 0
    out[2] = 0
    out[3] = 0
    return 1


def key_bytes(str text):
    """The key's bytes, or None when nftnl's Python path must decide."""
    cdef bytes raw
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    cdef const uint8_t* s = raw
    cdef Py_ssize_t n = len(raw)
    cdef uint8_t buf[4 * MAX_PARTS]
    cdef Py_ssize_t start = 0, i = 0, parts = 0
    while True:
        # the next " . " (or the end) closes a part
        i = start
        while i < n and not (s[i] == 32 and i + 2 < n and s[i + 1] == 46 and s[i + 2] == 32):
            if s[i] == 32:
                return None
            i += 1
        if parts == MAX_PARTS or not _part(s + start, i - start, buf + 4 * parts):
            return None
        parts += 1
        if i >= n:
            break
        start = i + 3
    return PyBytes_FromStringAndSize(<char*>buf, 4 * parts)


cdef inline void _hdr(uint8_t* p, Py_ssize_t length, int kind) noexcept:
    """A netlink attribute header: length and type, host order."""
    (<uint16_t*>p)[0] = <uint16_t>length
    (<uint16_t*>p)[1] = <uint16_t>kind


cdef enum:
    NESTED = 0x8000


def element_attr(str key, str value):
    """A set element's whole NFTA_LIST_ELEM (its key and, for a map, its data) as
    kproxy.backends.nftnl.Batch.element writes it, for the common forms: a key of the forms
    above; a value that is empty, a key of those forms, or a verdict (drop, accept, return, or
    jump/goto an ASCII chain name). None for anything else: nftnl's Python path decides."""
    cdef bytes kb = key_bytes(key)
    if kb is None:
        return None
    cdef Py_ssize_t k = len(kb), v = 0, name_len = 0, name_pad = 0, data = 0
    cdef bytes vb = None, name = None
    cdef uint32_t code = 0
    cdef str verdict, chain
    if value:
        verdict, _, chain = value.partition(" ")
        if verdict == "goto" or verdict == "jump":
            if not chain:
                return None
            code = 0xFFFFFFFC if verdict == "goto" else 0xFFFFFFFD
            try:
                name = chain.encode("ascii")
            except UnicodeEncodeError:
                return None
            if b"\0" in name:
                return None
            name_len = len(name) + 1
            name_pad = (4 - name_len % 4) % 4
            data = 4 + 4 + 8 + 4 + name_len + name_pad  # data { verdict { code, chain } }
        elif verdict == "drop" or verdict == "accept" or verdict == "return":
            if chain:
                return None
            code = 0 if verdict == "drop" else (1 if verdict == "accept" else 0xFFFFFFFB)
            data = 4 + 4 + 8
        else:
            vb = key_bytes(value)
            if vb is None:
                return None
            v = len(vb)
            data = 8 + v
    cdef Py_ssize_t total = 4 + 8 + k + data
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* p = <uint8_t*>(<char*>out)
    _hdr(p, total, 1 | NESTED)  # NFTA_LIST_ELEM
    _hdr(p + 4, 8 + k, 1 | NESTED)  # NFTA_SET_ELEM_KEY
    _hdr(p + 8, 4 + k, 1)  # NFTA_DATA_VALUE
    memcpy(p + 12, <char*>kb, k)
    p += 12 + k
    if vb is not None:
        _hdr(p, 8 + v, 2 | NESTED)  # NFTA_SET_ELEM_DATA
        _hdr(p + 4, 4 + v, 1)
        memcpy(p + 8, <char*>vb, v)
    elif data:
        _hdr(p, data, 2 | NESTED)  # NFTA_SET_ELEM_DATA
        _hdr(p + 4, data - 4, 2 | NESTED)  # NFTA_DATA_VERDICT
        _hdr(p + 8, 8, 1)  # NFTA_VERDICT_CODE, big-endian
        p[12] = (code >> 24) & 255
        p[13] = (code >> 16) & 255
        p[14] = (code >> 8) & 255
        p[15] = code & 255
        if name is not None:
            _hdr(p + 16, 4 + name_len, 2)  # NFTA_VERDICT_CHAIN
            memcpy(p + 20, <char*>name, name_len - 1)
            memset(p + 20 + name_len - 1, 0, 1 + name_pad)
    return out
