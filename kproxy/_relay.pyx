# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The userspace proxy's byte path: one epoll loop that runs without the GIL.

TCP bytes move socket -> pipe -> socket with splice(2), so they are never copied into user space;
UDP datagrams move in batches with recvmmsg/sendmmsg. Python only adds and removes listeners and
endpoint tables, under a mutex the loop holds while it handles one batch of events; the loop is
woken by an eventfd. The pure-Python twin with the same API is kproxy.relay.AsyncioRelayCore.

Why the loop never frees a listener, session or connection in the middle of a batch: epoll may
already have returned events for it. Dead objects are marked and freed once the batch is done.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, free, realloc
from libc.string cimport memcpy, memset, memcmp
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, ECONNREFUSED, ETIMEDOUT, EMFILE, ENFILE, ENOBUFS, ENOMEM
from posix.unistd cimport close, read, write
from cpython.bytes cimport PyBytes_AsString

import socket as _socket


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    enum: CLOCK_MONOTONIC

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct linger:
        int l_onoff
        int l_linger
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, socklen_t alen)
    int accept4(int fd, sockaddr* addr, socklen_t* alen, int flags)
    int setsockopt(int fd, int level, int name, const void* val, socklen_t vlen)
    int getsockopt(int fd, int level, int name, void* val, socklen_t* vlen)
    int shutdown(int fd, int how)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    int recvmmsg(int fd, mmsghdr* msgs, unsigned int n, int flags, timespec* timeout)
    int sendmmsg(int fd, mmsghdr* msgs, unsigned int n, int flags)
    enum: AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC
    enum: SOL_SOCKET, SO_ERROR, SO_LINGER, SHUT_WR, MSG_DONTWAIT, MSG_NOSIGNAL

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        in6_addr sin6_addr
    enum: IPPROTO_TCP
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<netinet/tcp.h>" nogil:
    enum: TCP_NODELAY, TCP_CONGESTION

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<fcntl.h>" nogil:
    ctypedef long long loff_t
    ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out, size_t n, unsigned int flags)
    int pipe2(int* fds, int flags)
    int fcntl(int fd, int cmd, ...)
    enum: SPLICE_F_MOVE, SPLICE_F_NONBLOCK, O_NONBLOCK, O_CLOEXEC, F_SETPIPE_SZ

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* ev)
    int epoll_wait(int epfd, epoll_event* evs, int maxevents, int timeout)
    enum: EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLLET
    enum: EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLL_CLOEXEC

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    int pthread_mutex_destroy(pthread_mutex_t* m)


DEF NBUCKETS = 256        # per listener, for ClientIP affinity and UDP sessions
DEF MAXEVENTS = 256
DEF UDP_BATCH = 32
DEF UDP_BUF = 65536
DEF ACCEPT_BATCH = 128
DEF PIPE_SIZE = 262144    # more pipe slots: one splice moves more of a socket's skbs
DEF POOL_MAX = 256        # idle pipes kept for reuse
DEF COPY_BUF = 16384      # a direction's reads are copied through this until one fills it, then spliced

cdef enum:
    K_LISTENER = 1
    K_CLIENT = 2
    K_UPSTREAM = 3
    K_SESSION = 4
    K_WAKE = 5

cdef struct Backend:
    sockaddr_storage addr
    socklen_t alen

cdef struct HNode:
    HNode* next
    void* owner
    int klen
    uint8_t key[20]

cdef struct Affinity:
    HNode node
    Backend backend
    double expires

cdef struct Listener:
    int kind
    int dead
    int id
    int fd
    int udp
    int paused      # out of fds: accept paused until the next sweep
    Backend* backends
    int nbackends
    unsigned int rr
    double affinity_timeout   # 0: no ClientIP affinity
    double udp_timeout
    HNode** aff
    HNode** sess
    Listener* next

cdef struct Session:
    int kind
    int dead
    HNode node
    int fd
    Listener* l
    sockaddr_storage client
    socklen_t clen
    double last

cdef struct Pipe:
    int r
    int w
    ssize_t fill
    int bulk        # this direction filled a whole copy buffer once: splice from now on

cdef struct Conn

cdef struct Side:
    int kind
    Conn* conn

cdef struct Conn:
    Side cs        # client side: data.ptr for the accepted socket
    Side us        # upstream side
    int dead
    int cfd
    int ufd
    int lid
    int connecting
    int tries
    double deadline
    unsigned int next_idx
    uint8_t ckey[20]
    int cklen
    Pipe c2u
    Pipe u2c
    int c_eof       # client sent FIN (read side done)
    int u_eof
    int c_shut      # we sent FIN to the client
    int u_shut
    Conn* prev
    Conn* next


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint32_t _hash(const uint8_t* key, int n) noexcept nogil:
    cdef uint32_t h = 2166136261u
    cdef int i
    for i in range(n):
        h = (h ^ key[i]) * 16777619u
    return h


cdef int _ip_key(const sockaddr_storage* sa, uint8_t* key, int with_port) noexcept nogil:
    """Client IP (and port for UDP sessions) as hash key bytes; returns the key length."""
    cdef const sockaddr_in* s4
    cdef const sockaddr_in6* s6
    if sa.ss_family == AF_INET:
        s4 = <const sockaddr_in*>sa
        memcpy(key, &s4.sin_addr, 4)
        if with_port:
            memcpy(key + 4, &s4.sin_port, 2)
            return 6
        return 4
    s6 = <const sockaddr_in6*>sa
    memcpy(key, &s6.sin6_addr, 16)
    if with_port:
        memcpy(key + 16, &s6.sin6_port, 2)
        return 18
    return 16


cdef HNode* _hfind(HNode** buckets, const uint8_t* key, int klen) noexcept nogil:
    cdef HNode* n = buckets[_hash(key, klen) % NBUCKETS]
    while n != NULL:
        if n.klen == klen and memcmp(n.key, key, klen) == 0:
            return n
        n = n.next
    return NULL


cdef void _hinsert(HNode** buckets, HNode* node) noexcept nogil:
    cdef uint32_t b = _hash(node.key, node.klen) % NBUCKETS
    node.next = buckets[b]
    buckets[b] = node


cdef void _hremove(HNode** buckets, HNode* node) noexcept nogil:
    cdef uint32_t b = _hash(node.key, node.klen) % NBUCKETS
    cdef HNode** pp = &buckets[b]
    while pp[0] != NULL:
        if pp[0] == node:
            pp[0] = node.next
            return
        pp = &pp[0].next


cdef inline void _set_nodelay(int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))


cdef inline void _close_reset(int fd) noexcept nogil:
    """Close with an RST instead of a FIN: the peer learns at once that nobody is there."""
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    close(fd)


cdef class RelayCore:
    """Compiled relay core. Drive it from Python: `run()` in a thread, the rest from anywhere."""

    cdef int ep
    cdef int wakefd
    cdef pthread_mutex_t mu
    cdef Listener* listeners
    cdef Conn* conns
    cdef int next_id
    cdef int stopping
    cdef double connect_timeout
    cdef char cc[16]          # TCP congestion control for upstream sockets ("": the node's default)
    cdef int cc_len
    cdef void** dead
    cdef int ndead
    cdef int capdead
    cdef int wake_kind
    # Pipes are held only while bytes are in flight: an idle connection costs two fds, not six.
    cdef int* pool
    cdef int npool
    # UDP batch buffers, used only by the loop thread.
    cdef uint8_t* ubuf
    cdef char* tbuf           # the copy path's buffer (one loop thread: one buffer)
    cdef mmsghdr* umsg
    cdef iovec* uiov
    cdef sockaddr_storage* uaddr
    # counters (read under the mutex)
    cdef uint64_t n_accepted
    cdef uint64_t n_active
    cdef uint64_t n_connect_fail
    cdef uint64_t n_no_endpoints
    cdef uint64_t n_bytes
    cdef uint64_t n_udp_sessions
    cdef uint64_t n_udp_in
    cdef uint64_t n_udp_out
    cdef uint64_t n_accept_paused

    def __cinit__(self, double connect_timeout=1.0, bytes tcp_congestion=b""):
        cdef epoll_event ev
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.ep < 0 or self.wakefd < 0:
            raise OSError(errno, "relay: epoll_create1/eventfd failed")
        pthread_mutex_init(&self.mu, NULL)
        self.wake_kind = K_WAKE
        ev.events = EPOLLIN
        ev.data.ptr = &self.wake_kind
        epoll_ctl(self.ep, EPOLL_CTL_ADD, self.wakefd, &ev)
        self.connect_timeout = connect_timeout
        if len(tcp_congestion) > 15:
            raise ValueError(f"relay: TCP congestion control name {tcp_congestion!r} is too long")
        self.cc_len = len(tcp_congestion)
        memset(self.cc, 0, 16)
        if self.cc_len:
            memcpy(self.cc, PyBytes_AsString(tcp_congestion), self.cc_len)
        self.next_id = 1
        self.capdead = 64
        self.dead = <void**>malloc(self.capdead * sizeof(void*))
        self.ubuf = <uint8_t*>malloc(UDP_BATCH * UDP_BUF)
        self.umsg = <mmsghdr*>calloc(UDP_BATCH, sizeof(mmsghdr))
        self.uiov = <iovec*>calloc(UDP_BATCH, sizeof(iovec))
        self.uaddr = <sockaddr_storage*>calloc(UDP_BATCH, sizeof(sockaddr_storage))
        self.pool = <int*>malloc(2 * POOL_MAX * sizeof(int))
        self.tbuf = <char*>malloc(COPY_BUF)
        if not self.tbuf or not self.pool or not self.dead or not self.ubuf or not self.umsg or not self.uiov or not self.uaddr:
            raise MemoryError()

    def __dealloc__(self):
        cdef Listener* l
        cdef Conn* c
        cdef int i
        # Only reached once the loop thread has returned (the Python wrapper joins it first).
        while self.conns != NULL:
            c = self.conns
            self._close_conn(c, 0)
        while self.listeners != NULL:
            l = self.listeners
            self._drop_listener(l)
        self._free_dead()
        for i in range(2 * self.npool):
            close(self.pool[i])
        free(self.pool)
        if self.ep >= 0:
            close(self.ep)
        if self.wakefd >= 0:
            close(self.wakefd)
        pthread_mutex_destroy(&self.mu)
        free(self.dead)
        free(self.ubuf)
        free(self.tbuf)
        free(self.umsg)
        free(self.uiov)
        free(self.uaddr)

    # ------------------------------------------------------------------ Python-facing control

    def run(self) -> None:
        """The forwarding loop; returns after stop(). Holds no GIL while it runs."""
        with nogil:
            self._loop()

    def stop(self) -> None:
        self.stopping = 1
        self._wake()

    def add_listener(self, int fd, bint udp) -> int:
        """Take ownership of a bound (and, for TCP, listening) non-blocking socket fd."""
        cdef Listener* l = <Listener*>calloc(1, sizeof(Listener))
        cdef epoll_event ev
        if l == NULL:
            raise MemoryError()
        l.kind = K_LISTENER
        l.fd = fd
        l.udp = udp
        l.udp_timeout = 30.0
        l.aff = <HNode**>calloc(NBUCKETS, sizeof(HNode*))
        l.sess = <HNode**>calloc(NBUCKETS, sizeof(HNode*))
        if l.aff == NULL or l.sess == NULL:
            free(l.aff)
            free(l.sess)
            free(l)
            raise MemoryError()
        if not udp:
            # Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt here
            # instead of one per connection.
            _set_nodelay(fd)
        with nogil:
            pthread_mutex_lock(&self.mu)
            l.id = self.next_id
            self.next_id += 1
            l.next = self.listeners
            self.listeners = l
            ev.events = EPOLLIN
            ev.data.ptr = l
            epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev)
            pthread_mutex_unlock(&self.mu)
        return l.id

    def remove_listener(self, int lid) -> None:
        """Close the listener and its UDP sessions; open TCP connections run to their end."""
        cdef Listener* l
        with nogil:
            pthread_mutex_lock(&self.mu)
            l = self._find(lid)
            if l != NULL:
                self._unlink_listener(l)
                self._drop_listener(l)
            pthread_mutex_unlock(&self.mu)
        self._wake()

    def set_endpoints(self, int lid, list endpoints, double affinity_timeout=0.0,
                      double udp_timeout=30.0) -> None:
        """Replace the listener's endpoints [(ip, port), ...]; new connections use them at once."""
        cdef int n = len(endpoints)
        cdef Backend* arr = <Backend*>calloc(n if n > 0 else 1, sizeof(Backend))
        cdef Backend* old
        cdef Listener* l
        cdef sockaddr_in* s4
        cdef sockaddr_in6* s6
        cdef int i
        cdef bytes ipb
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                ip, port = endpoints[i]
                ipb = str(ip).encode("ascii")
                if ":" in ip:
                    s6 = <sockaddr_in6*>&arr[i].addr
                    s6.sin6_family = AF_INET6
                    s6.sin6_port = htons(<uint16_t>int(port))
                    if inet_pton(AF_INET6, PyBytes_AsString(ipb), &s6.sin6_addr) != 1:
                        raise ValueError(f"endpoint {ip!r}: not an IPv6 address")
                    arr[i].alen = sizeof(sockaddr_in6)
                else:
                    s4 = <sockaddr_in*>&arr[i].addr
                    s4.sin_family = AF_INET
                    s4.sin_port = htons(<uint16_t>int(port))
                    if inet_pton(AF_INET, PyBytes_AsString(ipb), &s4.sin_addr) != 1:
                        raise ValueError(f"endpoint {ip!r}: not an IPv4 address")
                    arr[i].alen = sizeof(sockaddr_in)
        except BaseException:
            free(arr)
            raise
        with nogil:
            pthread_mutex_lock(&self.mu)
            l = self._find(lid)
            if l == NULL:
                old = arr
            else:
                old = l.backends
                l.backends = arr
                l.nbackends = n
                l.affinity_timeout = affinity_timeout
                l.udp_timeout = udp_timeout
            pthread_mutex_unlock(&self.mu)
            free(old)
        if l == NULL:
            raise KeyError(f"relay: no listener {lid}")

    def stats(self) -> dict:
        with nogil:
            pthread_mutex_lock(&self.mu)
        d = {
            "accepted": self.n_accepted, "active": self.n_active,
            "connect_failures": self.n_connect_fail, "no_endpoints": self.n_no_endpoints,
            "bytes": self.n_bytes, "udp_sessions": self.n_udp_sessions,
            "udp_in": self.n_udp_in, "udp_out": self.n_udp_out, "accept_paused": self.n_accept_paused,
        }
        pthread_mutex_unlock(&self.mu)
        return d

    # ------------------------------------------------------------------ loop internals (nogil)

    cdef void _wake(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.wakefd, &one, 8)

    cdef Listener* _find(self, int lid) noexcept nogil:
        cdef Listener* l = self.listeners
        while l != NULL and l.id != lid:
            l = l.next
        return l

    cdef void _defer(self, void* p) noexcept nogil:
        cdef void** grown
        if self.ndead == self.capdead:
            grown = <void**>realloc(self.dead, 2 * self.capdead * sizeof(void*))
            if grown == NULL:
                return  # leak rather than free under a live event
            self.dead = grown
            self.capdead *= 2
        self.dead[self.ndead] = p
        self.ndead += 1

    cdef void _free_dead(self) noexcept nogil:
        cdef int i
        for i in range(self.ndead):
            free(self.dead[i])
        self.ndead = 0

    cdef void _unlink_listener(self, Listener* l) noexcept nogil:
        cdef Listener** pp = &self.listeners
        while pp[0] != NULL:
            if pp[0] == l:
                pp[0] = l.next
                return
            pp = &pp[0].next

    cdef void _drop_listener(self, Listener* l) noexcept nogil:
        cdef int b
        cdef HNode* n
        cdef HNode* nx
        cdef Session* s
        if l.dead:
            return
        l.dead = 1
        self._unlink_listener(l)
        close(l.fd)
        for b in range(NBUCKETS):
            n = l.sess[b]
            while n != NULL:
                nx = n.next
                s = <Session*>n.owner
                s.dead = 1
                close(s.fd)
                self.n_udp_sessions -= 1
                self._defer(s)
                n = nx
            n = l.aff[b]
            while n != NULL:
                nx = n.next
                free(n.owner)
                n = nx
        free(l.sess)
        free(l.aff)
        free(l.backends)
        l.sess = NULL
        l.aff = NULL
        l.backends = NULL
        l.nbackends = 0
        self._defer(l)

    cdef int _pick(self, Listener* l, const uint8_t* key, int klen) noexcept nogil:
        """Next endpoint for a client: its pinned one under ClientIP affinity, else round robin.
        Returns an index into l.backends or -1 when there are none."""
        cdef Affinity* a
        cdef HNode* n
        cdef int i
        cdef double now
        if l.nbackends == 0:
            return -1
        if l.affinity_timeout > 0:
            n = _hfind(l.aff, key, klen)
            if n != NULL:
                a = <Affinity*>n.owner
                now = _now()
                if a.expires > now:
                    for i in range(l.nbackends):
                        if (l.backends[i].alen == a.backend.alen and
                                memcmp(&l.backends[i].addr, &a.backend.addr, a.backend.alen) == 0):
                            a.expires = now + l.affinity_timeout
                            return i
        i = <int>(l.rr % <unsigned int>l.nbackends)
        l.rr += 1
        return i

    cdef void _pin(self, Listener* l, const uint8_t* key, int klen, int idx) noexcept nogil:
        cdef HNode* n
        cdef Affinity* a
        if l.affinity_timeout <= 0:
            return
        n = _hfind(l.aff, key, klen)
        if n == NULL:
            a = <Affinity*>calloc(1, sizeof(Affinity))
            if a == NULL:
                return
            a.node.owner = a
            a.node.klen = klen
            memcpy(a.node.key, key, klen)
            _hinsert(l.aff, &a.node)
        else:
            a = <Affinity*>n.owner
        a.backend = l.backends[idx]
        a.expires = _now() + l.affinity_timeout

    # ---- TCP

    cdef void _accept(self, Listener* l) noexcept nogil:
        cdef sockaddr_storage ca
        cdef socklen_t clen
        cdef int fd, i, idx
        cdef Conn* c
        cdef epoll_event ev
        for i in range(ACCEPT_BATCH):
            clen = sizeof(ca)
            fd = accept4(l.fd, <sockaddr*>&ca, &clen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # The listener stays readable while we cannot accept: stop watching it
                    # until the next sweep instead of spinning on it.
                    self.n_accept_paused += 1
                    l.paused = 1
                    ev.events = 0
                    ev.data.ptr = l
                    epoll_ctl(self.ep, EPOLL_CTL_MOD, l.fd, &ev)
                return
            self.n_accepted += 1
            if l.nbackends == 0:
                # No endpoints: refuse at once rather than hold the client until a timeout.
                self.n_no_endpoints += 1
                _close_reset(fd)
                continue
            c = <Conn*>calloc(1, sizeof(Conn))
            if c == NULL:
                _close_reset(fd)
                continue
            c.cs.kind = K_CLIENT
            c.cs.conn = c
            c.us.kind = K_UPSTREAM
            c.us.conn = c
            c.cfd = fd
            c.ufd = -1
            c.c2u.r = c.c2u.w = c.u2c.r = c.u2c.w = -1
            c.lid = l.id
            c.cklen = _ip_key(&ca, c.ckey, 0)
            c.next = self.conns
            if self.conns != NULL:
                self.conns.prev = c
            self.conns = c
            self.n_active += 1
            idx = self._pick(l, c.ckey, c.cklen)
            c.next_idx = <unsigned int>idx
            self._connect(c, l)
            if not c.dead:
                self._forward_early(c)
            if not c.dead:
                # Watched only now: the bytes passed on early raise no event of their own, and
                # EPOLL_CTL_ADD reports whatever arrived since.
                ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
                ev.data.ptr = &c.cs
                epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev)

    cdef void _connect(self, Conn* c, Listener* l) noexcept nogil:
        """Start a connect to endpoint c.next_idx; on refusal move on until every one was tried."""
        cdef int fd, idx, r
        cdef epoll_event ev
        cdef Backend* b
        while l != NULL and c.tries < l.nbackends:
            idx = <int>(c.next_idx % <unsigned int>l.nbackends)
            c.next_idx = <unsigned int>(idx + 1)
            c.tries += 1
            b = &l.backends[idx]
            fd = socket(b.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            if fd < 0:
                break
            _set_nodelay(fd)
            if self.cc_len:
                # Checked by the caller when the core was built; a failure here keeps the default.
                setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, self.cc, <socklen_t>self.cc_len)
            r = connect(fd, <sockaddr*>&b.addr, b.alen)
            if r < 0 and errno != EINPROGRESS:
                close(fd)
                self.n_connect_fail += 1
                continue
            c.ufd = fd
            c.connecting = 1
            c.deadline = _now() + self.connect_timeout
            self._pin(l, c.ckey, c.cklen, idx)
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.ptr = &c.us
            epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev)
            return
        self._close_conn(c, 1)

    cdef void _connect_failed(self, Conn* c) noexcept nogil:
        self.n_connect_fail += 1
        close(c.ufd)
        c.ufd = -1
        c.connecting = 0
        self._connect(c, self._find(c.lid))

    cdef int _get_pipe(self, Pipe* p) noexcept nogil:
        cdef int fds[2]
        if p.r >= 0:
            return 0
        if self.npool > 0:
            self.npool -= 1
            p.r = self.pool[2 * self.npool]
            p.w = self.pool[2 * self.npool + 1]
            p.fill = 0
            return 0
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return -1
        fcntl(fds[1], F_SETPIPE_SZ, <int>PIPE_SIZE)
        p.r = fds[0]
        p.w = fds[1]
        p.fill = 0
        return 0

    cdef void _put_pipe(self, Pipe* p) noexcept nogil:
        if p.r < 0:
            return
        if p.fill == 0 and self.npool < POOL_MAX:
            self.pool[2 * self.npool] = p.r
            self.pool[2 * self.npool + 1] = p.w
            self.npool += 1
        else:
            close(p.r)   # still holds bytes nobody will read
            close(p.w)
        p.r = p.w = -1
        p.fill = 0

    cdef void _established(self, Conn* c, uint32_t events) noexcept nogil:
        # epoll re-polls the socket when it reports it, so EPOLLOUT without ERR/HUP means the
        # connect succeeded: no getsockopt(SO_ERROR) needed.
        c.connecting = 0
        # Client events were ignored while connecting: its bytes (or FIN) may be waiting.
        if self._pump(c.cfd, c.ufd, &c.c2u, &c.c_eof, &c.u_shut, &c.u_eof, &c.c_shut, 1) < 0:
            self._close_conn(c, 1)
            return
        # The upstream's edge for bytes that came with the connect is in `events`; later ones
        # raise an edge of their own, so an empty upstream is not read in vain.
        if events & (EPOLLIN | EPOLLRDHUP):
            if self._pump(c.ufd, c.cfd, &c.u2c, &c.u_eof, &c.c_shut, &c.c_eof, &c.u_shut,
                          events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) < 0:
                self._close_conn(c, 1)
                return
        if c.c_shut and c.u_shut:
            self._close_conn(c, 0)

    cdef int _pump(self, int src, int dst, Pipe* p, int* src_eof, int* dst_shut,
                   int* dst_eof, int* src_shut, int drain) noexcept nogil:
        """Move what src has to dst through the pipe until one of them would block.
        drain: read src until EAGAIN or EOF even after a short read, because a FIN may be queued
        behind the bytes (its edge came with the event being handled, or was ignored while
        connecting). Returns -1 when the connection is broken (reset either side)."""
        cdef ssize_t n
        while True:
            if p.fill > 0:
                n = splice(p.r, NULL, dst, NULL, <size_t>p.fill, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    p.fill -= n
                    self.n_bytes += <uint64_t>n
                    continue
                if n < 0 and errno == EAGAIN:
                    return 0   # dst is full: its EPOLLOUT edge resumes us
                if n < 0 and errno == EINTR:
                    continue
                return -1
            if src_eof[0]:
                self._put_pipe(p)
                if not dst_shut[0]:
                    # Half-close: pass the FIN on, keep the other direction open. When the other
                    # direction is already over (dst sent its FIN, which we passed on), the
                    # close() that follows sends this FIN: skip the shutdown syscall.
                    if not (dst_eof[0] and src_shut[0]):
                        shutdown(dst, SHUT_WR)
                    dst_shut[0] = 1
                return 0
            if not p.bulk:
                n = self._copy(src, dst, p, src_eof)
                if n == 2 and not drain:
                    self._put_pipe(p)
                    return 0
                if n <= 0:
                    return <int>n
                continue
            if p.r < 0 and self._get_pipe(p) < 0:
                return -1
            n = splice(src, NULL, p.w, NULL, <size_t>PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                p.fill += n
                continue
            if n == 0:
                src_eof[0] = 1
                continue
            if errno == EAGAIN:
                self._put_pipe(p)   # empty: give it back until src has bytes again
                return 0
            if errno == EINTR:
                continue
            return -1

    cdef ssize_t _copy(self, int src, int dst, Pipe* p, int* src_eof) noexcept nogil:
        """One read of a direction that has only seen small messages, passed on by copy: for a
        request or a reply, recv + send cost less than splicing through a pipe, and a short read
        says the socket is drained (the next bytes raise a new edge), which saves the read that
        would fail with EAGAIN. Returns 1 to read again, 2 after a short read, 0 when done until
        the next event, -1 when broken."""
        cdef ssize_t n, m
        n = recv(src, self.tbuf, COPY_BUF, MSG_DONTWAIT)
        if n == 0:
            src_eof[0] = 1
            return 1
        if n < 0:
            if errno == EINTR:
                return 1
            if errno == EAGAIN:
                self._put_pipe(p)
                return 0
            return -1
        m = send(dst, self.tbuf, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if m < 0:
            if errno != EAGAIN and errno != EINTR:
                return -1
            m = 0
        self.n_bytes += <uint64_t>m
        if m < n:
            # dst is full: dst's EPOLLOUT edge resumes the direction from the pipe.
            if self._spill(p, m, n) < 0:
                return -1
            if n == COPY_BUF:
                p.bulk = 1
            return 0
        if n == COPY_BUF:
            p.bulk = 1   # a stream: its bytes need not pass through user space
            return 1
        return 2

    cdef int _spill(self, Pipe* p, ssize_t m, ssize_t n) noexcept nogil:
        """Keep tbuf[m:n], read but not yet sent, in the direction's pipe (empty, and larger than
        COPY_BUF), where the next pump finds it first, as it finds spliced bytes. -1 on failure."""
        cdef ssize_t w
        if p.r < 0 and self._get_pipe(p) < 0:
            return -1
        w = write(p.w, self.tbuf + m, <size_t>(n - m))
        if w != n - m:
            return -1
        p.fill += w
        return 0

    cdef void _forward_early(self, Conn* c) noexcept nogil:
        """Over a local link the upstream handshake completes inside connect(), and the client's
        first bytes are often queued by then: pass them on now, not one loop turn later when the
        connect's EPOLLOUT is reported. A send that is refused means the endpoint refused the
        connect: the next endpoint gets the bytes."""
        cdef ssize_t n, m
        n = recv(c.cfd, self.tbuf, COPY_BUF, MSG_DONTWAIT)
        if n == 0:
            c.c_eof = 1   # _established passes the FIN on
            return
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                self._close_conn(c, 1)
            return
        while True:
            m = send(c.ufd, self.tbuf, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
            if m >= 0 or errno == EAGAIN or errno == EINTR:
                break
            self._connect_failed(c)
            if c.dead:
                return
        if m > 0:
            c.connecting = 0
            self.n_bytes += <uint64_t>m
        else:
            m = 0   # still connecting: EPOLLOUT takes it from the pipe
        if m < n and self._spill(&c.c2u, m, n) < 0:
            self._close_conn(c, 1)
            return
        if n == COPY_BUF:
            c.c2u.bulk = 1
            if not c.connecting and c.c2u.fill == 0:
                if self._pump(c.cfd, c.ufd, &c.c2u, &c.c_eof, &c.u_shut, &c.u_eof, &c.c_shut, 1) < 0:
                    self._close_conn(c, 1)

    cdef void _conn_event(self, Side* s, uint32_t events) noexcept nogil:
        cdef Conn* c = s.conn
        cdef int r = 0
        cdef uint32_t hup
        if c.dead:
            return
        if c.connecting:
            if s.kind == K_UPSTREAM:
                if events & (EPOLLERR | EPOLLHUP):
                    self._connect_failed(c)   # refused or reset: the next endpoint
                elif events & EPOLLOUT:
                    self._established(c, events)
            elif events & EPOLLERR:
                self._close_conn(c, 1)   # client gone before the upstream answered
            return
        # Only the directions this event concerns: readable (or FIN/error) moves this side's
        # bytes on; writable resumes the other side's bytes only if some wait in its pipe.
        # Pumping both on every event cost a failed splice or two per event.
        # A resumed direction drains its source: the source's own edges may have come and gone
        # while its bytes waited in the pipe.
        hup = events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)
        if s.kind == K_CLIENT:
            if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                r = self._pump(c.cfd, c.ufd, &c.c2u, &c.c_eof, &c.u_shut, &c.u_eof, &c.c_shut, hup)
            if r == 0 and (events & EPOLLOUT) and c.u2c.fill > 0:
                r = self._pump(c.ufd, c.cfd, &c.u2c, &c.u_eof, &c.c_shut, &c.c_eof, &c.u_shut, 1)
        else:
            if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                r = self._pump(c.ufd, c.cfd, &c.u2c, &c.u_eof, &c.c_shut, &c.c_eof, &c.u_shut, hup)
            if r == 0 and (events & EPOLLOUT) and c.c2u.fill > 0:
                r = self._pump(c.cfd, c.ufd, &c.c2u, &c.c_eof, &c.u_shut, &c.u_eof, &c.c_shut, 1)
        if r < 0:
            self._close_conn(c, 1)
        elif events & EPOLLERR:
            self._close_conn(c, 1)
        elif c.c_shut and c.u_shut:
            self._close_conn(c, 0)

    cdef void _close_conn(self, Conn* c, int reset) noexcept nogil:
        if c.dead:
            return
        c.dead = 1
        if reset:
            _close_reset(c.cfd)
            if c.ufd >= 0:
                _close_reset(c.ufd)
        else:
            close(c.cfd)
            if c.ufd >= 0:
                close(c.ufd)
        self._put_pipe(&c.c2u)
        self._put_pipe(&c.u2c)
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.conns = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        self.n_active -= 1
        self._defer(c)

    # ---- UDP

    cdef Session* _session(self, Listener* l, sockaddr_storage* ca, socklen_t clen) noexcept nogil:
        cdef uint8_t key[20]
        cdef int klen = _ip_key(ca, key, 1)
        cdef HNode* n = _hfind(l.sess, key, klen)
        cdef Session* s
        cdef int idx, fd, tries
        cdef uint8_t ikey[20]
        cdef int iklen
        cdef epoll_event ev
        cdef Backend* b
        if n != NULL:
            return <Session*>n.owner
        iklen = _ip_key(ca, ikey, 0)
        idx = self._pick(l, ikey, iklen)
        if idx < 0:
            return NULL
        b = &l.backends[idx]
        fd = socket(b.addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return NULL
        if connect(fd, <sockaddr*>&b.addr, b.alen) < 0:
            close(fd)
            return NULL
        self._pin(l, ikey, iklen, idx)
        s = <Session*>calloc(1, sizeof(Session))
        if s == NULL:
            close(fd)
            return NULL
        s.kind = K_SESSION
        s.fd = fd
        s.l = l
        memcpy(&s.client, ca, clen)
        s.clen = clen
        s.node.owner = s
        s.node.klen = klen
        memcpy(s.node.key, key, klen)
        _hinsert(l.sess, &s.node)
        self.n_udp_sessions += 1
        ev.events = EPOLLIN
        ev.data.ptr = s
        epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev)
        return s

    cdef void _drop_session(self, Session* s) noexcept nogil:
        if s.dead:
            return
        s.dead = 1
        _hremove(s.l.sess, &s.node)
        close(s.fd)
        self.n_udp_sessions -= 1
        self._defer(s)

    cdef void _udp_from_clients(self, Listener* l) noexcept nogil:
        cdef int i, n
        cdef Session* s
        cdef double now = _now()
        for i in range(UDP_BATCH):
            self.uiov[i].iov_base = self.ubuf + i * UDP_BUF
            self.uiov[i].iov_len = UDP_BUF
            memset(&self.umsg[i].msg_hdr, 0, sizeof(msghdr))
            self.umsg[i].msg_hdr.msg_iov = &self.uiov[i]
            self.umsg[i].msg_hdr.msg_iovlen = 1
            self.umsg[i].msg_hdr.msg_name = &self.uaddr[i]
            self.umsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        n = recvmmsg(l.fd, self.umsg, UDP_BATCH, MSG_DONTWAIT, NULL)
        for i in range(n):
            self.n_udp_in += 1
            s = self._session(l, &self.uaddr[i], self.umsg[i].msg_hdr.msg_namelen)
            if s == NULL:
                continue   # no endpoints: drop, as a closed UDP port would
            s.last = now
            send(s.fd, self.uiov[i].iov_base, self.umsg[i].msg_len, MSG_DONTWAIT)

    cdef void _udp_from_backend(self, Session* s) noexcept nogil:
        cdef int i, n, m
        if s.dead:
            return
        for i in range(UDP_BATCH):
            self.uiov[i].iov_base = self.ubuf + i * UDP_BUF
            self.uiov[i].iov_len = UDP_BUF
            memset(&self.umsg[i].msg_hdr, 0, sizeof(msghdr))
            self.umsg[i].msg_hdr.msg_iov = &self.uiov[i]
            self.umsg[i].msg_hdr.msg_iovlen = 1
        n = recvmmsg(s.fd, self.umsg, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n < 0:
            if errno == ECONNREFUSED:
                # The endpoint's port is closed: forget the session so the next datagram
                # from this client picks another endpoint.
                self._drop_session(s)
            return
        for i in range(n):
            # Replies leave through the listener so the client sees the service address.
            self.uiov[i].iov_len = self.umsg[i].msg_len
            self.umsg[i].msg_hdr.msg_name = &s.client
            self.umsg[i].msg_hdr.msg_namelen = s.clen
        m = sendmmsg(s.l.fd, self.umsg, <unsigned int>n, MSG_DONTWAIT)
        if m > 0:
            self.n_udp_out += <uint64_t>m
        s.last = _now()

    # ---- timers and the loop

    cdef void _sweep(self, double now) noexcept nogil:
        cdef Listener* l = self.listeners
        cdef Listener* lnext
        cdef Conn* c = self.conns
        cdef Conn* cnext
        cdef HNode* n
        cdef HNode* nx
        cdef Session* s
        cdef Affinity* a
        cdef int b
        cdef epoll_event ev
        while c != NULL:
            cnext = c.next
            if c.connecting and c.deadline < now:
                self._connect_failed(c)
            c = cnext
        while l != NULL:
            lnext = l.next
            if l.paused:
                l.paused = 0
                ev.events = EPOLLIN
                ev.data.ptr = l
                epoll_ctl(self.ep, EPOLL_CTL_MOD, l.fd, &ev)
            for b in range(NBUCKETS):
                n = l.sess[b]
                while n != NULL:
                    nx = n.next
                    s = <Session*>n.owner
                    if s.last + l.udp_timeout < now:
                        self._drop_session(s)
                    n = nx
                n = l.aff[b]
                while n != NULL:
                    nx = n.next
                    a = <Affinity*>n.owner
                    if a.expires < now:
                        _hremove(l.aff, n)
                        free(a)
                    n = nx
            l = lnext

    cdef void _loop(self) noexcept nogil:
        cdef epoll_event evs[MAXEVENTS]
        cdef int n, i, kind
        cdef uint64_t junk
        cdef double now, last_sweep = _now()
        cdef void* p
        while not self.stopping:
            n = epoll_wait(self.ep, evs, MAXEVENTS, 100)
            pthread_mutex_lock(&self.mu)
            for i in range(n):
                p = evs[i].data.ptr
                kind = (<int*>p)[0]
                if kind == K_CLIENT or kind == K_UPSTREAM:
                    self._conn_event(<Side*>p, evs[i].events)
                elif kind == K_LISTENER:
                    if not (<Listener*>p).dead:
                        if (<Listener*>p).udp:
                            self._udp_from_clients(<Listener*>p)
                        else:
                            self._accept(<Listener*>p)
                elif kind == K_SESSION:
                    self._udp_from_backend(<Session*>p)
                elif kind == K_WAKE:
                    read(self.wakefd, &junk, 8)
            now = _now()
            if now - last_sweep >= 0.1:
                self._sweep(now)
                last_sweep = now
            self._free_dead()
            pthread_mutex_unlock(&self.mu)
