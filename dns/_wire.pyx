# cython: language_level=3
# distutils: define_macros=_GNU_SOURCE=1
"""Compiled per-query hot path of kdns. Twin: kdns/_purewire.py (same API, identical bytes).

drain_udp reads up to 64 datagrams per recvmmsg(2), answers the ones the pre-encoded table covers
straight from C buffers and sends them with one sendmmsg(2); Python sees only the misses.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free

import socket

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct sockaddr_storage:
        unsigned short ss_family
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *m)
    cmsghdr *CMSG_NXTHDR(msghdr *m, cmsghdr *c)
    unsigned char *CMSG_DATA(cmsghdr *c)
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC
    int AF_INET
    int AF_INET6

cdef extern from "<time.h>" nogil:
    struct timespec2 "timespec":
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec2 *tp)
    int CLOCK_MONOTONIC

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        unsigned int s_addr
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr
    int IPPROTO_IP
    int IP_PKTINFO
    int IPPROTO_IPV6
    int IPV6_PKTINFO
    unsigned short ntohs(unsigned short)
    unsigned int ntohl(unsigned int)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

DEF BATCH = 64
DEF MAXQ = 4096
DEF OUTCAP = 65546
DEF NBUCKETS = 16
DEF CTRL = 64  # room for one in_pktinfo/in6_pktinfo control message

UDP_SIZE = 1232
UDP_SIZE_MAX = 4096
LOOPBACK4 = bytes((127, 0, 0, 0, 255, 0, 0, 0))
LOOPBACK6 = bytes(15) + b"\x01" + b"\xff" * 16
BUCKETS = tuple(0.00025 * 2**i for i in range(16))
cdef unsigned char OPT_RR[11]
OPT_RR[:] = [0, 0, 0x29, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]  # the udp size (octets 3-4) is patched per table
cdef double C_BUCKETS[NBUCKETS]
for _i in range(NBUCKETS):
    C_BUCKETS[_i] = 0.00025 * (2 ** _i)


cdef class Table:
    """See kdns._purewire.Table."""
    cdef public dict answers
    cdef public object names
    cdef public bytes zone
    cdef public bytes pod_zone
    cdef public bytes soa_tail
    cdef public bint synced
    cdef readonly bytes allow4
    cdef readonly bytes allow6
    cdef readonly int udp_size

    def __init__(self):
        self.answers = {}
        self.names = frozenset()
        self.zone = b"\x00"
        self.pod_zone = b"\x00"
        self.soa_tail = b""
        self.synced = False
        self.allow4 = LOOPBACK4
        self.allow6 = LOOPBACK6
        self.udp_size = UDP_SIZE

    def guard(self, bytes allow4, bytes allow6, int udp_size):
        if len(allow4) % 8 or len(allow6) % 32 or not 512 <= udp_size <= UDP_SIZE_MAX:
            raise ValueError("allow4/allow6 must be 8/32-byte rules and udp_size 512..4096")
        self.allow4 = allow4
        self.allow6 = allow6
        self.udp_size = udp_size

    def update(self, dict answers, names, bytes zone, bytes pod_zone, bytes soa_tail, bint synced):
        self.answers = answers
        self.names = names
        self.zone = zone
        self.pod_zone = pod_zone
        self.soa_tail = soa_tail
        self.synced = synced


cdef class Stats:
    """See kdns._purewire.Stats."""
    cdef unsigned long long types[65536]
    cdef unsigned long long rcodes[16]
    cdef unsigned long long buckets[NBUCKETS + 1]
    cdef double total
    cdef unsigned long long count

    def __cinit__(self):
        memset(self.types, 0, sizeof(self.types))
        memset(self.rcodes, 0, sizeof(self.rcodes))
        memset(self.buckets, 0, sizeof(self.buckets))
        self.total = 0.0
        self.count = 0

    cdef inline void _record(self, int qtype, int rcode, double seconds) noexcept:
        cdef int i = 0
        self.types[qtype & 0xFFFF] += 1
        self.rcodes[rcode & 0xF] += 1
        while i < NBUCKETS and seconds > C_BUCKETS[i]:
            i += 1
        self.buckets[i] += 1
        self.total += seconds
        self.count += 1

    def record(self, int qtype, int rcode, double seconds):
        self._record(qtype, rcode, seconds)

    def snapshot(self):
        cdef int i
        return {
            "types": {i: self.types[i] for i in range(65536) if self.types[i]},
            "rcodes": {i: self.rcodes[i] for i in range(16) if self.rcodes[i]},
            "buckets": [self.buckets[i] for i in range(NBUCKETS + 1)],
            "sum": self.total,
            "count": self.count,
        }


cdef inline int _under(const unsigned char *lname, int n, const unsigned char *zone, int zl) noexcept:
    """Offset in lname where the suffix zone starts on a label boundary, or -1."""
    cdef int pos = 0, j
    while True:
        if n - pos == zl:
            j = 0
            while j < zl and lname[pos + j] == zone[j]:
                j += 1
            if j == zl:
                return pos
        if n - pos < zl or lname[pos] == 0:
            return -1
        pos += lname[pos] + 1


cdef int _answer(const unsigned char *q, int n, Table table, bint tcp, unsigned char *out,
                 int *qtype_out) except -2:
    """Writes the response into out (capacity OUTCAP) and returns its length, or -1 when the
    slow path must handle the query. *qtype_out is set once the question is parsed."""
    cdef int pos, ll, qend, qlen, qtype, ar, edns, rdlen, limit, rcode, zpos, k, outlen, i
    cdef unsigned char flags2, flags3
    cdef unsigned char lbuf[260]
    cdef PyObject *hit
    cdef bytes key, resp, soa, zone, pzone
    cdef const unsigned char *r
    qtype_out[0] = -1
    if n < 12 or (q[2] & 0xF8):
        return -1
    if q[4] != 0 or q[5] != 1 or q[6] != 0 or q[7] != 0 or q[8] != 0 or q[9] != 0 or q[10] != 0 or q[11] > 1:
        return -1
    ar = q[11]
    pos = 12
    while True:
        if pos >= n:
            return -1
        ll = q[pos]
        if ll == 0:
            break
        if ll & 0xC0:
            return -1
        pos += ll + 1
        if pos - 12 > 254:
            return -1
    qend = pos + 1
    qlen = qend - 12
    if qend + 4 > n:
        return -1
    qtype = (q[qend] << 8) | q[qend + 1]
    qtype_out[0] = qtype
    if q[qend + 2] != 0 or q[qend + 3] != 1:
        return -1
    pos = qend + 4
    edns = -1
    if ar:
        if pos + 11 > n or q[pos] != 0 or q[pos + 1] != 0 or q[pos + 2] != 41:
            return -1
        if q[pos + 6] != 0:
            return -1
        rdlen = (q[pos + 9] << 8) | q[pos + 10]
        if pos + 11 + rdlen != n:
            return -1
        edns = (q[pos + 3] << 8) | q[pos + 4]
        if edns < 512:
            edns = 512
    elif pos != n:
        return -1
    if not table.synced:
        return -1
    for i in range(qlen):
        k = q[12 + i]
        lbuf[i] = k + 32 if 65 <= k <= 90 else k
    lbuf[qlen] = q[qend]
    lbuf[qlen + 1] = q[qend + 1]
    if tcp:
        limit = 65535
    elif edns >= 0:
        limit = edns if edns < table.udp_size else table.udp_size
    else:
        limit = 512
    flags2 = q[2] & 0x01
    flags3 = q[3] & 0x10
    key = PyBytes_FromStringAndSize(<char *>lbuf, qlen + 2)
    hit = PyDict_GetItem(table.answers, key)
    if hit != NULL:
        resp = <bytes>hit
        outlen = PyBytes_GET_SIZE(resp)
        if outlen + 11 > OUTCAP:
            return -1
        memcpy(out, PyBytes_AS_STRING(resp), outlen)
        out[0] = q[0]
        out[1] = q[1]
        out[2] |= flags2
        out[3] |= flags3
        memcpy(out + 12, q + 12, qlen)
    else:
        zone = table.zone
        pzone = table.pod_zone
        zpos = _under(lbuf, qlen, <const unsigned char *>PyBytes_AS_STRING(zone), PyBytes_GET_SIZE(zone))
        if zpos < 0:
            return -1
        if _under(lbuf, qlen, <const unsigned char *>PyBytes_AS_STRING(pzone), PyBytes_GET_SIZE(pzone)) >= 0:
            return -1
        rcode = 0 if PyBytes_FromStringAndSize(<char *>lbuf, qlen) in table.names else 3
        soa = table.soa_tail
        out[0] = q[0]
        out[1] = q[1]
        out[2] = 0x84 | flags2
        out[3] = 0x80 | flags3 | rcode
        out[4] = 0; out[5] = 1; out[6] = 0; out[7] = 0; out[8] = 0; out[9] = 1; out[10] = 0; out[11] = 0
        memcpy(out + 12, q + 12, qlen + 4)
        outlen = 12 + qlen + 4
        k = 0xC000 | (12 + zpos)
        out[outlen] = k >> 8
        out[outlen + 1] = k & 0xFF
        outlen += 2
        memcpy(out + outlen, PyBytes_AS_STRING(soa), PyBytes_GET_SIZE(soa))
        outlen += PyBytes_GET_SIZE(soa)
    if edns >= 0:
        out[11] += 1
        memcpy(out + outlen, OPT_RR, 11)
        out[outlen + 3] = table.udp_size >> 8
        out[outlen + 4] = table.udp_size & 0xFF
        outlen += 11
    if outlen > limit:
        out[2] |= 0x02
        out[4] = 0; out[5] = 1; out[6] = 0; out[7] = 0; out[8] = 0; out[9] = 0; out[10] = 0
        out[11] = 1 if edns >= 0 else 0
        memcpy(out + 12, q + 12, qlen + 4)
        outlen = 12 + qlen + 4
        if edns >= 0:
            memcpy(out + outlen, OPT_RR, 11)
            out[outlen + 3] = table.udp_size >> 8
            out[outlen + 4] = table.udp_size & 0xFF
            outlen += 11
    return outlen


cdef unsigned char *_answer_buf = <unsigned char *>malloc(OUTCAP)


def answer(bytes query, Table table, bint tcp):
    """See kdns._purewire.answer. One shared output buffer: callers hold the GIL throughout."""
    cdef int qtype, n
    if _answer_buf == NULL:
        raise MemoryError()
    n = _answer(<const unsigned char *>PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query), table, tcp,
                _answer_buf, &qtype)
    if n < 0:
        return None
    return PyBytes_FromStringAndSize(<char *>_answer_buf, n)


cdef inline bint _match(const unsigned char *src, int n, bytes rules) noexcept:
    cdef const unsigned char *r = <const unsigned char *>PyBytes_AS_STRING(rules)
    cdef Py_ssize_t total = PyBytes_GET_SIZE(rules), off = 0
    cdef int k
    while off + 2 * n <= total:
        k = 0
        while k < n and (src[k] & r[off + n + k]) == r[off + k]:
            k += 1
        if k == n:
            return True
        off += 2 * n
    return False


cdef inline bint _allowed(sockaddr_storage *sa, Table table) noexcept:
    """See kdns._purewire.allowed: the source against the table's (network, mask) pairs."""
    cdef const unsigned char *a
    if sa.ss_family == AF_INET:
        return _match(<const unsigned char *>&(<sockaddr_in *>sa).sin_addr, 4, table.allow4)
    if sa.ss_family != AF_INET6:
        return False
    a = (<sockaddr_in6 *>sa).sin6_addr.s6_addr
    if a[0] == 0 and a[1] == 0 and a[2] == 0 and a[3] == 0 and a[4] == 0 and a[5] == 0 and a[6] == 0 \
            and a[7] == 0 and a[8] == 0 and a[9] == 0 and a[10] == 0xFF and a[11] == 0xFF:
        return _match(a + 12, 4, table.allow4)  # IPv4-mapped: a v4 client on a dual-stack socket
    return _match(a, 16, table.allow6)


def allowed(addr, Table table):
    """See kdns._purewire.allowed (for tests; drain_udp checks the raw sockaddr)."""
    cdef bytes raw
    host = addr[0].split("%", 1)[0]
    if ":" not in host:
        raw = socket.inet_pton(socket.AF_INET, host)
        return _match(<const unsigned char *>PyBytes_AS_STRING(raw), 4, table.allow4)
    raw = socket.inet_pton(socket.AF_INET6, host)
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":
        return _match(<const unsigned char *>PyBytes_AS_STRING(raw) + 12, 4, table.allow4)
    return _match(<const unsigned char *>PyBytes_AS_STRING(raw), 16, table.allow6)


cdef object _addr(sockaddr_storage *sa):
    cdef char text[64]
    cdef sockaddr_in *v4
    cdef sockaddr_in6 *v6
    if sa.ss_family == AF_INET:
        v4 = <sockaddr_in *>sa
        inet_ntop(AF_INET, &v4.sin_addr, text, 64)
        return (text.decode("ascii"), ntohs(v4.sin_port))
    v6 = <sockaddr_in6 *>sa
    inet_ntop(AF_INET6, &v6.sin6_addr, text, 64)
    return (text.decode("ascii"), ntohs(v6.sin6_port), ntohl(v6.sin6_flowinfo), v6.sin6_scope_id)


cdef int _reply_pktinfo(msghdr *m) noexcept:
    """Turn a received IP_PKTINFO/IPV6_PKTINFO into the one to send the reply with, so the reply
    leaves from the address the query was sent to (a socket bound to 0.0.0.0 on a host with several
    addresses would otherwise answer from the route's preferred source, which clients drop).
    Returns 1 when m's control data now holds exactly that message."""
    cdef cmsghdr *c
    cdef in_pktinfo *pi
    if m.msg_controllen == 0:
        return 0
    c = CMSG_FIRSTHDR(m)
    while c != NULL:
        if c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO:
            pi = <in_pktinfo *>CMSG_DATA(c)
            pi.ipi_spec_dst = pi.ipi_addr  # source := where the query went
            pi.ipi_ifindex = 0
            m.msg_control = <void *>c
            m.msg_controllen = c.cmsg_len
            return 1
        if c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO:
            m.msg_control = <void *>c  # ipi6_addr (the query's destination) becomes the source
            m.msg_controllen = c.cmsg_len
            return 1
        c = CMSG_NXTHDR(m, c)
    return 0


cdef list _ancillary(msghdr *m, int have):
    """The reply's control message as socket.sendmsg takes it (empty when there is none)."""
    cdef cmsghdr *c
    if not have:
        return []
    c = <cmsghdr *>m.msg_control
    n = c.cmsg_len - (<size_t>CMSG_DATA(c) - <size_t>c)
    return [(c.cmsg_level, c.cmsg_type, PyBytes_FromStringAndSize(<char *>CMSG_DATA(c), n))]


cdef class _Buffers:
    """recvmmsg/sendmmsg vectors, allocated once per socket."""
    cdef unsigned char *inbuf
    cdef unsigned char *outbuf
    cdef mmsghdr rvec[BATCH]
    cdef mmsghdr svec[BATCH]
    cdef iovec riov[BATCH]
    cdef iovec siov[BATCH]
    cdef sockaddr_storage addrs[BATCH]
    cdef unsigned char ctrl[BATCH][CTRL]

    def __cinit__(self):
        self.inbuf = <unsigned char *>malloc(BATCH * MAXQ)
        self.outbuf = <unsigned char *>malloc(BATCH * OUTCAP)
        if self.inbuf == NULL or self.outbuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.inbuf)
        free(self.outbuf)


cdef dict _buffers = {}


def drain_udp(sock, Table table, Stats stats, int max_batches):
    """See kdns._purewire.drain_udp. Queries over 4096 octets are truncated by the kernel and
    dropped (MSG_TRUNC): no DNS client sends a query that large."""
    cdef int fd = sock.fileno()
    cdef _Buffers b
    cdef int got, i, j, nsend, r, qt, batch, have
    cdef int qtypes[BATCH]
    cdef int lens[BATCH]
    cdef timespec2 t0, t1
    cdef double dt
    cdef list misses = []
    b = _buffers.get(fd)
    if b is None:
        b = _Buffers()
        _buffers[fd] = b
    for batch in range(max_batches):
        for i in range(BATCH):
            b.riov[i].iov_base = b.inbuf + i * MAXQ
            b.riov[i].iov_len = MAXQ
            memset(&b.rvec[i].msg_hdr, 0, sizeof(msghdr))
            b.rvec[i].msg_hdr.msg_iov = &b.riov[i]
            b.rvec[i].msg_hdr.msg_iovlen = 1
            b.rvec[i].msg_hdr.msg_name = &b.addrs[i]
            b.rvec[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            b.rvec[i].msg_hdr.msg_control = &b.ctrl[i][0]
            b.rvec[i].msg_hdr.msg_controllen = CTRL
        with nogil:
            got = recvmmsg(fd, b.rvec, BATCH, MSG_DONTWAIT, NULL)
        if got <= 0:
            break
        clock_gettime(CLOCK_MONOTONIC, &t0)
        nsend = 0
        for i in range(got):
            if b.rvec[i].msg_hdr.msg_flags & MSG_TRUNC:
                continue
            have = _reply_pktinfo(&b.rvec[i].msg_hdr)
            if _allowed(&b.addrs[i], table):
                r = _answer(b.inbuf + i * MAXQ, b.rvec[i].msg_len, table, False, b.outbuf + nsend * OUTCAP, &qt)
            else:
                r = -1  # the slow path refuses it (and counts it)
            if r < 0:
                misses.append((PyBytes_FromStringAndSize(<char *>(b.inbuf + i * MAXQ), b.rvec[i].msg_len),
                               _addr(&b.addrs[i]), _ancillary(&b.rvec[i].msg_hdr, have)))
                continue
            b.siov[nsend].iov_base = b.outbuf + nsend * OUTCAP
            b.siov[nsend].iov_len = r
            memset(&b.svec[nsend].msg_hdr, 0, sizeof(msghdr))
            b.svec[nsend].msg_hdr.msg_iov = &b.siov[nsend]
            b.svec[nsend].msg_hdr.msg_iovlen = 1
            b.svec[nsend].msg_hdr.msg_name = &b.addrs[i]
            b.svec[nsend].msg_hdr.msg_namelen = b.rvec[i].msg_hdr.msg_namelen
            if have:
                b.svec[nsend].msg_hdr.msg_control = b.rvec[i].msg_hdr.msg_control
                b.svec[nsend].msg_hdr.msg_controllen = b.rvec[i].msg_hdr.msg_controllen
            qtypes[nsend] = qt
            lens[nsend] = r
            nsend += 1
        j = 0
        while j < nsend:
            with nogil:
                r = sendmmsg(fd, b.svec + j, nsend - j, MSG_DONTWAIT)
            if r <= 0:
                break  # full socket buffer: the rest are dropped, as UDP does; clients retry
            j += r
        clock_gettime(CLOCK_MONOTONIC, &t1)
        dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9
        for i in range(nsend):
            stats._record(qtypes[i], (b.outbuf + i * OUTCAP)[3] & 0xF, dt)
        if got < BATCH:
            break
    return misses


def forget_socket(sock):
    """Free the batch buffers of a socket that is being closed."""
    _buffers.pop(sock.fileno(), None)
