"""A mutation fuzzer for DNS queries, seeded with real ones (dnspython-built queries of every shape
the cluster DNS sees: the zone's names, reverse names, names to forward, all common types, with
and without EDNS, with options, RD/CD set or not). Each generated packet is a seed with 1 to 4
mutations: byte and bit flips, inserts, deletes, truncation, splices of two seeds, and the
structure-aware ones that reach deep into a parser (header counts, label lengths, compression
pointers, the OPT record's size, version and rdlength, the TCP length prefix's lie)."""
from __future__ import annotations

import random
import struct

import dns.edns
import dns.flags
import dns.message

ZONE = "cluster.local"
NAMES = [f"web.default.svc.{ZONE}", f"WEB.Default.svc.{ZONE}", f"hl.default.svc.{ZONE}",
         f"_http._tcp.web.default.svc.{ZONE}", f"_http._tcp.hl.default.svc.{ZONE}", f"nope.default.svc.{ZONE}",
         f"default.svc.{ZONE}", ZONE, f"dns-version.{ZONE}", f"10-1-2-3.default.pod.{ZONE}",
         f"1-2-3-4.ns.pod.{ZONE}", "10.0.96.10.in-addr.arpa", ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0"
                                                          ".0.0.d.f.ip6.arpa"), "example.org", "a.b.c.d.e.f.g.h.example.com", f"x.{ZONE}", "xcluster.local"]
TYPES: list[str | int] = ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "CNAME", "MX", "ANY", 99, 65535]


def seeds(seed: int = 1, names: list[str] = NAMES, types: list[str | int] = TYPES,
          sizes: tuple[int | None, ...] = (None, 512, 1232, 4096)) -> list[bytes]:
    """Every name x type x EDNS size (None: no EDNS), with random IDs, RD/CD and an EDNS option."""
    rnd = random.Random(seed)
    out: list[bytes] = []
    for name in names:
        for t in types:
            for edns in sizes:
                q = dns.message.make_query(name, t, use_edns=False if edns is None else 0, payload=edns or 512)
                q.id = rnd.randrange(65536)
                if rnd.random() < 0.3:
                    q.flags &= ~dns.flags.RD
                if rnd.random() < 0.2:
                    q.flags |= dns.flags.CD
                if edns and rnd.random() < 0.3:
                    q.use_edns(0, payload=edns, options=[dns.edns.GenericOption(10, b"12345678")])
                out.append(q.to_wire())
    return out


_HEADER_FIELDS = (2, 4, 6, 8, 10)
_COUNTS = (0, 1, 2, 255, 65535)
_LENGTHS = (0, 1, 63, 64, 0x40, 0x80, 0xC0, 0xFF)
_SIZES = (0, 1, 511, 512, 4096, 65535)


class Mutator:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.seeds = seeds(seed)

    def packet(self) -> bytes:
        # int(r() * n) instead of randrange(n): a third of the cost, and this runs a million times
        r = self.rnd.random
        seeds = self.seeds
        p = bytearray(seeds[int(r() * len(seeds))])
        for _ in range(1 + int(r() * 4)):
            n = len(p)
            op = int(r() * 12)
            if n == 0:
                p += self.rnd.randbytes(1 + int(r() * 39))
            elif op == 0:
                p[int(r() * n)] = int(r() * 256)
            elif op == 1:
                p[int(r() * n)] ^= 1 << int(r() * 8)
            elif op == 2:
                del p[int(r() * n):]
            elif op == 3:
                i = int(r() * (n + 1))
                p[i:i] = self.rnd.randbytes(1 + int(r() * 7))
            elif op == 4:
                i = int(r() * n)
                del p[i:i + 1 + int(r() * 7)]
            elif op == 5:  # splice: the head of this seed, the tail of another
                other = seeds[int(r() * len(seeds))]
                p = p[:int(r() * (n + 1))] + other[int(r() * (len(other) + 1)):]
            elif op == 6 and n >= 12:  # header counts and flags
                struct.pack_into("!H", p, _HEADER_FIELDS[int(r() * 5)], _COUNTS[int(r() * len(_COUNTS))]
                                 if r() < 0.8 else int(r() * 65536))
            elif op == 7 and n > 12:  # a label length that lies
                p[12 + int(r() * (n - 12))] = _LENGTHS[int(r() * len(_LENGTHS))]
            elif op == 8 and n > 13:  # a compression pointer anywhere (forwards, loops, self)
                i = 12 + int(r() * (n - 13))
                target = (0, 12, i, i + 2, int(r() * 0x4000))[int(r() * 5)]
                struct.pack_into("!H", p, i, 0xC000 | (target & 0x3FFF))
            elif op == 9 and n >= 11:  # the OPT record's fields (udp size, version, rdlength)
                tail = n - 11 + (3, 6, 9)[int(r() * 3)]
                if 0 <= tail < n - 1:
                    struct.pack_into("!H", p, tail, _SIZES[int(r() * len(_SIZES))] if r() < 0.8 else int(r() * 65536))
            elif op == 10:  # repeat a chunk (many questions, long names)
                i = int(r() * n)
                chunk = p[i:i + 1 + int(r() * 63)]
                p[i:i] = chunk * (1 + int(r() * 19))
            else:
                p = p[:12 + int(r() * max(1, n - 11))] + self.rnd.randbytes(int(r() * 30))
        return bytes(p[:4096])

    def batch(self, n: int) -> list[bytes]:
        return [self.packet() for _ in range(n)]

    def tcp_stream(self, n: int, lie: bool) -> bytes:
        """n length-prefixed packets; with `lie`, one prefix (at a random place) lies about its
        length, so what follows it is read as part of that message or as a new one."""
        out = bytearray()
        at = self.rnd.randrange(n) if lie else -1
        for i in range(n):
            p = self.packet()
            ln = len(p) if i != at else self.rnd.randrange(65536)
            out += struct.pack("!H", ln) + p
        return bytes(out)
