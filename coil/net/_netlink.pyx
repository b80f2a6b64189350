# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""rtnetlink for coild, the Cython extension.

Builds and parses raw rtnetlink messages itself over an AF_NETLINK socket
(no pyroute2). Same API as the pure-Python twin ``coil.net._netlink_py``; see
that module for the method list. ``Link``, ``Addr`` and ``Route`` are the
NamedTuples of ``coil.net.types``, so both backends return the same types.

Every change request carries NLM_F_ACK and a fresh sequence number and waits
for its ACK; dumps are read until NLMSG_DONE (and repeated when the kernel
flags them NLM_F_DUMP_INTR). Failures raise ``coil.errors.NetlinkError``
with the kernel's errno and a context naming the object.

``open_netlink(netns)`` creates the socket inside ``netns`` (None, a path
or an fd) by switching the calling thread with setns(2), creating the
socket and switching back at once (``coil.net.ns.in_netns``, the one
namespace entry of coil); the socket stays bound to that namespace. Opening costs a few syscalls (no
fork, no subprocess).

A handle may be shared by threads: calls are serialised by a per-handle
lock and the GIL is released while waiting for the kernel.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t
from libc.string cimport memcpy, memset, strlen
from libc.stdlib cimport malloc, free
from libc.errno cimport errno
from cpython.exc cimport PyErr_CheckSignals
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_DecodeASCII
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_acquire_lock,
                               PyThread_release_lock, NOWAIT_LOCK, WAIT_LOCK)

import errno as _errno
import os as _os
import socket as _socket

from coil.errors import NetlinkError
from coil.net.ns import in_netns, ns_label, open_ns_fd, target_label
from coil.net.types import (Link, Addr, Route, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK,
                            RT_SCOPE_HOST, RT_TABLE_MAIN, RTPROT_STATIC)

__all__ = ["open_netlink", "Netlink", "Link", "Addr", "Route",
           "RT_SCOPE_UNIVERSE", "RT_SCOPE_LINK", "RT_SCOPE_HOST",
           "RTPROT_STATIC", "RT_TABLE_MAIN"]

# ---------------------------------------------------------------------------
# libc

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    ssize_t send(int fd, const void *buf, size_t len, int flags)
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    int AF_NETLINK
    int AF_INET
    int AF_INET6
    int SOCK_RAW
    int SOCK_CLOEXEC
    int MSG_TRUNC
    int MSG_DONTWAIT

cdef extern from "<linux/netlink.h>" nogil:
    struct sockaddr_nl:
        unsigned short nl_family
        unsigned int nl_pid
        unsigned int nl_groups

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

# ---------------------------------------------------------------------------
# rtnetlink constants (uapi values; stable ABI). Those also named in
# coil.net.types are compile-time copies here, checked against it on import.

cdef enum:
    NETLINK_ROUTE = 0
    SOL_NETLINK = 270
    NETLINK_CAP_ACK = 10

    NLMSG_HDRLEN = 16
    NLMSG_NOOP = 1
    NLMSG_ERROR = 2
    NLMSG_DONE = 3

    NLM_F_REQUEST = 0x1
    NLM_F_MULTI = 0x2
    NLM_F_ACK = 0x4
    NLM_F_DUMP_INTR = 0x10
    NLM_F_DUMP = 0x300
    NLM_F_REPLACE = 0x100
    NLM_F_EXCL = 0x200
    NLM_F_CREATE = 0x400

    RTM_NEWLINK = 16
    RTM_DELLINK = 17
    RTM_GETLINK = 18
    RTM_SETLINK = 19
    RTM_NEWADDR = 20
    RTM_DELADDR = 21
    RTM_GETADDR = 22
    RTM_NEWROUTE = 24
    RTM_DELROUTE = 25
    RTM_GETROUTE = 26

    NLA_TYPE_MASK = 0x3fff

    IFLA_ADDRESS = 1
    IFLA_IFNAME = 3
    IFLA_MTU = 4
    IFLA_LINKINFO = 18
    IFLA_GROUP = 27
    IFLA_NET_NS_FD = 28
    IFLA_EXT_MASK = 29
    IFLA_NUM_TX_QUEUES = 31
    IFLA_NUM_RX_QUEUES = 32
    IFLA_INFO_KIND = 1
    IFLA_INFO_DATA = 2
    VETH_INFO_PEER = 1
    RTEXT_FILTER_SKIP_STATS = 8
    IFF_UP = 1

    IFA_ADDRESS = 1
    IFA_LOCAL = 2
    IFA_FLAGS = 8
    IFA_F_NODAD = 0x02

    RTA_DST = 1
    RTA_OIF = 4
    RTA_GATEWAY = 5
    RTA_TABLE = 15
    RTA_PRIORITY = 6
    RTN_UNICAST = 1
    RT_SCOPE_NOWHERE = 255

    IFNAMSIZ = 16
    REQ_SIZE = 512
    RECV_SIZE = 65536

    # what _xfer does with the replies
    P_NONE = 0
    P_LINK = 1
    P_ADDR = 2
    P_ROUTE = 3

    DUMP_RETRIES = 10
    DUMP_INTERRUPTED = 0x10000

# ---------------------------------------------------------------------------
# byte helpers (memcpy: no alignment assumptions)

cdef inline uint16_t rd16(const char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

cdef inline uint32_t rd32(const char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v

cdef inline void wr16(char *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)

cdef inline void wr32(char *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)

cdef inline int align4(int n) noexcept nogil:
    return (n + 3) & ~3

cdef inline int put_attr(char *b, int off, uint16_t typ, const void *data,
                         int dlen) noexcept nogil:
    cdef int alen = 4 + dlen
    cdef int end = off + align4(alen)
    wr16(b + off, <uint16_t>alen)
    wr16(b + off + 2, typ)
    if dlen > 0:
        memcpy(b + off + 4, data, dlen)
    if end > off + alen:
        memset(b + off + alen, 0, end - off - alen)
    return end

cdef inline int put_u32(char *b, int off, uint16_t typ, uint32_t v) noexcept nogil:
    return put_attr(b, off, typ, &v, 4)

cdef inline int put_str(char *b, int off, uint16_t typ, const char *s,
                        int n) noexcept nogil:
    # n bytes of s plus the terminating NUL
    cdef int alen = 4 + n + 1
    cdef int end = off + align4(alen)
    wr16(b + off, <uint16_t>alen)
    wr16(b + off + 2, typ)
    memcpy(b + off + 4, s, n)
    memset(b + off + 4 + n, 0, end - off - 4 - n)
    return end

cdef inline void end_nest(char *b, int start, int end) noexcept nogil:
    wr16(b + start, <uint16_t>(end - start))

cdef inline int put_hdr(char *b, uint16_t typ, uint16_t flags) noexcept nogil:
    # nlmsghdr; length and sequence number are filled in by _xfer
    wr32(b, 0)
    wr16(b + 4, typ)
    wr16(b + 6, flags)
    wr32(b + 8, 0)
    wr32(b + 12, 0)
    return NLMSG_HDRLEN

cdef const char *HEX = b"0123456789abcdef"

cdef str fmt_mac(const char *p, int n):
    cdef char out[96]
    cdef int i, j = 0
    if n <= 0:
        return ""
    if n > 32:
        n = 32
    for i in range(n):
        if i:
            out[j] = b':'
            j += 1
        out[j] = HEX[(<uint8_t>p[i]) >> 4]
        out[j + 1] = HEX[(<uint8_t>p[i]) & 15]
        j += 2
    return PyUnicode_DecodeASCII(out, j, NULL)

cdef str fmt_ip(int family, const char *p, int n):
    cdef char out[64]
    if (family == AF_INET and n < 4) or (family == AF_INET6 and n < 16):
        return None
    if inet_ntop(family, p, out, sizeof(out)) == NULL:
        return None
    return PyUnicode_DecodeASCII(out, strlen(out), NULL)

cdef str cstr(const char *p, int n):
    return PyUnicode_DecodeUTF8(p, strnlen(p, n), "replace")

cdef int parse_ip(str text, char *out) except -1:
    """inet_pton for either family; returns the family or 0 when invalid."""
    cdef bytes b
    cdef int family
    try:
        b = text.encode("ascii")
    except (UnicodeError, AttributeError):
        return 0
    if b"\0" in b:
        return 0
    if inet_pton(AF_INET, b, out) == 1:
        return AF_INET
    if inet_pton(AF_INET6, b, out) == 1:
        return AF_INET6
    return 0

cdef bytes ifname_or_none(name):
    """The name as bytes, or None when no link can have it."""
    cdef bytes b
    if not isinstance(name, str):
        return None
    b = (<str>name).encode("utf-8", "surrogateescape")
    if len(b) == 0 or len(b) >= IFNAMSIZ or b"\0" in b:
        return None
    return b

cdef bytes ifname_bytes(name, str context):
    cdef bytes b
    if not isinstance(name, str):
        raise NetlinkError(context, _errno.EINVAL)
    b = (<str>name).encode("utf-8", "surrogateescape")
    if len(b) == 0 or len(b) >= IFNAMSIZ or b"\0" in b:
        raise NetlinkError(context, _errno.EINVAL)
    return b

cdef tuple_new = tuple.__new__

# ---------------------------------------------------------------------------
# reply parsers

cdef object parse_link(const char *m, int mlen):
    cdef int off = NLMSG_HDRLEN + 16, alen, atype, noff, nend
    cdef int32_t index
    cdef uint32_t flags, mtu = 0, group = 0
    cdef const char *d
    name = ""
    mac = ""
    kind = None
    if mlen < off:
        return None
    memcpy(&index, m + NLMSG_HDRLEN + 4, 4)
    flags = rd32(m + NLMSG_HDRLEN + 8)
    while off + 4 <= mlen:
        alen = rd16(m + off)
        atype = rd16(m + off + 2) & NLA_TYPE_MASK
        if alen < 4 or off + alen > mlen:
            break
        d = m + off + 4
        if atype == IFLA_IFNAME:
            name = cstr(d, alen - 4)
        elif atype == IFLA_MTU and alen >= 8:
            mtu = rd32(d)
        elif atype == IFLA_GROUP and alen >= 8:
            group = rd32(d)
        elif atype == IFLA_ADDRESS:
            mac = fmt_mac(d, alen - 4)
        elif atype == IFLA_LINKINFO:
            noff = off + 4
            nend = off + alen
            while noff + 4 <= nend:
                if rd16(m + noff) < 4 or noff + rd16(m + noff) > nend:
                    break
                if (rd16(m + noff + 2) & NLA_TYPE_MASK) == IFLA_INFO_KIND:
                    kind = cstr(m + noff + 4, rd16(m + noff) - 4)
                    break
                noff += align4(rd16(m + noff))
        off += align4(alen)
    return tuple_new(Link, (index, name, mtu, mac, bool(flags & IFF_UP), kind, group))

cdef object parse_addr(const char *m, int mlen, int want_index):
    cdef int off = NLMSG_HDRLEN + 8, alen, atype
    cdef int family, prefixlen, scope
    cdef int32_t index
    cdef const char *d
    cdef const char *local = NULL
    cdef const char *address = NULL
    cdef int local_len = 0, address_len = 0
    if mlen < off:
        return None
    family = <uint8_t>m[NLMSG_HDRLEN]
    if family != AF_INET and family != AF_INET6:
        return None
    memcpy(&index, m + NLMSG_HDRLEN + 4, 4)
    if want_index >= 0 and index != want_index:
        return None
    prefixlen = <uint8_t>m[NLMSG_HDRLEN + 1]
    scope = <uint8_t>m[NLMSG_HDRLEN + 3]
    while off + 4 <= mlen:
        alen = rd16(m + off)
        atype = rd16(m + off + 2) & NLA_TYPE_MASK
        if alen < 4 or off + alen > mlen:
            break
        d = m + off + 4
        if atype == IFA_LOCAL:
            local = d
            local_len = alen - 4
        elif atype == IFA_ADDRESS:
            address = d
            address_len = alen - 4
        off += align4(alen)
    if local != NULL:
        text = fmt_ip(family, local, local_len)
    elif address != NULL:
        text = fmt_ip(family, address, address_len)
    else:
        text = ""
    return tuple_new(Addr, (index, text, prefixlen, family, scope))

cdef object parse_route(const char *m, int mlen, int want_table, int want_proto):
    cdef int off = NLMSG_HDRLEN + 12, alen, atype
    cdef int family, dst_len, table, protocol, scope, rtype
    cdef const char *d
    cdef const char *dst = NULL
    cdef const char *gw = NULL
    cdef int dst_n = 0, gw_n = 0
    cdef bint has_oif = False
    cdef uint32_t oif = 0
    if mlen < off:
        return None
    family = <uint8_t>m[NLMSG_HDRLEN]
    if family != AF_INET and family != AF_INET6:
        return None
    protocol = <uint8_t>m[NLMSG_HDRLEN + 5]
    if want_proto >= 0 and protocol != want_proto:
        return None
    dst_len = <uint8_t>m[NLMSG_HDRLEN + 1]
    table = <uint8_t>m[NLMSG_HDRLEN + 4]
    scope = <uint8_t>m[NLMSG_HDRLEN + 6]
    rtype = <uint8_t>m[NLMSG_HDRLEN + 7]
    while off + 4 <= mlen:
        alen = rd16(m + off)
        atype = rd16(m + off + 2) & NLA_TYPE_MASK
        if alen < 4 or off + alen > mlen:
            break
        d = m + off + 4
        if atype == RTA_TABLE and alen >= 8:
            table = <int>rd32(d)
        elif atype == RTA_DST:
            dst = d
            dst_n = alen - 4
        elif atype == RTA_OIF and alen >= 8:
            oif = rd32(d)
            has_oif = True
        elif atype == RTA_GATEWAY:
            gw = d
            gw_n = alen - 4
        off += align4(alen)
    if want_table >= 0 and table != want_table:
        return None
    if dst != NULL:
        dst_text = fmt_ip(family, dst, dst_n)
    else:
        dst_text = "::" if family == AF_INET6 else "0.0.0.0"
    gw_text = fmt_ip(family, gw, gw_n) if gw != NULL else None
    return tuple_new(Route, (family, dst_text, dst_len,
                             oif if has_oif else None, gw_text,
                             table, protocol, scope, rtype))

from coil.net import types as _types
if ((NETLINK_ROUTE, IFF_UP, IFA_F_NODAD, RTN_UNICAST, RT_SCOPE_NOWHERE, IFNAMSIZ)
        != (_types.NETLINK_ROUTE, _types.IFF_UP, _types.IFA_F_NODAD, _types.RTN_UNICAST,
            _types.RT_SCOPE_NOWHERE, _types.IFNAMSIZ)):  # pragma: no cover - a build bug
    raise ImportError("coil.net._netlink: constants differ from coil.net.types")

# ---------------------------------------------------------------------------
# namespaces and sockets

cdef int ns_fd(netns, int *fd) except -1:
    """fd of a netns given as an int or a path (``coil.net.ns.open_ns_fd``);
    returns 1 when it was opened here (the caller closes it)."""
    f, owned = open_ns_fd(netns)
    fd[0] = <int>f
    return 1 if owned else 0

cdef int new_socket() noexcept nogil:
    """A bound NETLINK_ROUTE socket in the thread's netns, or -errno."""
    cdef int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)
    cdef int one = 1, e
    cdef sockaddr_nl addr
    if fd < 0:
        return -errno
    memset(&addr, 0, sizeof(addr))
    addr.nl_family = AF_NETLINK
    if bind(fd, <const sockaddr *>&addr, sizeof(addr)) < 0:
        e = errno
        close(fd)
        return -e
    # short ACKs: errors do not echo the whole request back
    setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof(one))
    return fd

cdef int socket_in(netns) except -1:
    """Create the socket inside netns (``coil.net.ns.in_netns``: setns
    there, create, setns back)."""
    cdef int fd
    if netns is None:
        fd = new_socket()
        if fd < 0:
            raise NetlinkError("opening a netlink socket", -fd)
        return fd
    with in_netns(netns):
        fd = new_socket()
    if fd < 0:
        raise NetlinkError(
            f"opening a netlink socket in network namespace {ns_label(netns)}", -fd)
    return fd


# ---------------------------------------------------------------------------

cdef class Netlink:
    """An rtnetlink socket bound to one network namespace."""

    cdef int fd
    cdef uint32_t seq
    cdef char *rbuf
    cdef PyThread_type_lock lock

    RT_SCOPE_UNIVERSE = RT_SCOPE_UNIVERSE
    RT_SCOPE_LINK = RT_SCOPE_LINK
    RT_SCOPE_HOST = RT_SCOPE_HOST
    RTPROT_STATIC = RTPROT_STATIC

    def __cinit__(self, netns=None):
        self.fd = -1
        self.rbuf = <char *>malloc(RECV_SIZE)
        if self.rbuf == NULL:
            raise MemoryError()
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()
        self.seq = 0
        self.fd = socket_in(netns)

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.rbuf != NULL:
            free(self.rbuf)
            self.rbuf = NULL
        if self.lock != NULL:
            PyThread_free_lock(self.lock)
            self.lock = NULL

    def close(self):
        cdef int fd
        self._lock()
        fd = self.fd
        self.fd = -1
        PyThread_release_lock(self.lock)
        if fd >= 0:
            close(fd)

    @property
    def closed(self):
        return self.fd < 0

    def fileno(self):
        return self.fd

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- transport ------------------------------------------------------------

    cdef inline void _lock(self):
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)

    cdef int _xfer(self, char *req, int reqlen, int parse, list out,
                   int f1=-1, int f2=-1) except -1:
        """Send one request and read its replies.

        Returns 0, a positive errno (kernel or socket error) or
        DUMP_INTERRUPTED. Parsed objects are appended to ``out``; f1/f2 are
        the parser's filters (-1: none): the link index for addresses, the
        table and the protocol for routes.
        """
        cdef ssize_t n
        cdef int off, mlen, mtype, mflags, rc, e
        cdef int32_t err
        cdef uint32_t seq
        cdef bint intr = False
        cdef bint first = True
        cdef const char *m
        cdef int fd
        self._lock()
        try:
            fd = self.fd
            if fd < 0:
                return _errno.EBADF
            self.seq += 1
            if self.seq == 0:
                self.seq = 1
            seq = self.seq
            wr32(req, <uint32_t>reqlen)
            wr32(req + 8, seq)
            while True:
                with nogil:
                    n = send(fd, req, reqlen, 0)
                    e = errno
                if n >= 0:
                    break
                if e != 4:  # EINTR
                    return e
                PyErr_CheckSignals()
            while True:
                # rtnetlink queues the answer (a dump: its first part) while
                # send() runs, in the sender's context: read it holding the
                # GIL, which saves two GIL hand-overs per request. A dump's
                # later parts are made in recv() (which may wait for RTNL)
                # and are read without it, as is anything not queued yet.
                n = -1
                e = _errno.EAGAIN
                if first:
                    first = False
                    n = recv(fd, self.rbuf, RECV_SIZE, MSG_TRUNC | MSG_DONTWAIT)
                    e = errno
                if n < 0 and e == _errno.EAGAIN:
                    with nogil:
                        n = recv(fd, self.rbuf, RECV_SIZE, MSG_TRUNC)
                        e = errno
                if n < 0:
                    if e == 4:  # EINTR: let Python handlers run, then retry
                        PyErr_CheckSignals()
                        continue
                    return e
                if n > RECV_SIZE:
                    return _errno.EMSGSIZE
                off = 0
                while off + NLMSG_HDRLEN <= n:
                    m = self.rbuf + off
                    mlen = <int>rd32(m)
                    if mlen < NLMSG_HDRLEN or off + mlen > n:
                        return _errno.EPROTO
                    off += align4(mlen)
                    if rd32(m + 8) != seq:
                        continue  # stale reply to an earlier request
                    mtype = rd16(m + 4)
                    mflags = rd16(m + 6)
                    if mtype == NLMSG_ERROR:
                        if mlen < NLMSG_HDRLEN + 4:
                            return _errno.EPROTO
                        memcpy(&err, m + NLMSG_HDRLEN, 4)
                        return -err
                    if mtype == NLMSG_DONE:
                        if mlen >= NLMSG_HDRLEN + 4:
                            memcpy(&err, m + NLMSG_HDRLEN, 4)
                            if err < 0:
                                return -err
                        return DUMP_INTERRUPTED if intr else 0
                    if mtype == NLMSG_NOOP:
                        continue
                    if mflags & NLM_F_DUMP_INTR:
                        intr = True
                    if parse == P_LINK:
                        obj = parse_link(m, mlen)
                    elif parse == P_ADDR:
                        obj = parse_addr(m, mlen, f1)
                    elif parse == P_ROUTE:
                        obj = parse_route(m, mlen, f1, f2)
                    else:
                        obj = None
                    if obj is not None:
                        out.append(obj)
        finally:
            PyThread_release_lock(self.lock)

    cdef list _dump(self, char *req, int reqlen, int parse, str context,
                    int f1=-1, int f2=-1):
        cdef list out
        cdef int rc, i
        for i in range(DUMP_RETRIES):
            out = []
            rc = self._xfer(req, reqlen, parse, out, f1, f2)
            if rc == 0:
                return out
            if rc != DUMP_INTERRUPTED:
                raise NetlinkError(context, rc)
        raise NetlinkError(context, _errno.EINTR)

    # -- links ----------------------------------------------------------------

    cdef object _getlink(self, int index, bytes name, str context):
        # context None: "getting link <name>" (built only on error)
        cdef char req[REQ_SIZE]
        cdef int off = put_hdr(req, RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK)
        cdef list out = []
        cdef int rc
        memset(req + off, 0, 16)
        memcpy(req + off + 4, &index, 4)
        off += 16
        if name is not None:
            off = put_str(req, off, IFLA_IFNAME, name, len(name))
        off = put_u32(req, off, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        rc = self._xfer(req, off, P_LINK, out)
        if rc == _errno.ENODEV:
            return None
        if rc:
            if context is None:
                context = f"getting link {name.decode('utf-8', 'replace')}"
            raise NetlinkError(context, rc)
        return out[0] if out else None

    def link_get(self, name):
        """The link called ``name`` or None."""
        cdef bytes b = ifname_or_none(name)
        if b is None:
            return None
        return self._getlink(0, b, None)

    def link_get_index(self, index):
        """The link with ``index`` or None."""
        if not isinstance(index, int) or index <= 0 or index > 0x7FFFFFFF:
            return None
        return self._getlink(<int>index, None, f"getting link index {index}")

    def link_list(self):
        cdef char req[REQ_SIZE]
        cdef int off = put_hdr(req, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
        memset(req + off, 0, 16)
        off += 16
        off = put_u32(req, off, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        return self._dump(req, off, P_LINK, "listing links")

    def veth_add(self, name, peer_name, peer_netns=None, mtu=None):
        """Create the veth pair name/peer_name in one request.

        The peer is created directly inside ``peer_netns`` (path or fd) when
        given. Returns the index of ``name``.

        Both ends get one TX and one RX queue (IFLA_NUM_TX/RX_QUEUES): that
        is what a veth uses anyway, and without them the kernel creates one
        queue per CPU and then cuts the real number down to one, which waits
        for an RCU grace period while it holds the RTNL lock (every other
        netlink change on the host waits meanwhile).
        """
        cdef str context = f"creating veth {name}/{peer_name}"
        cdef bytes b_name = ifname_bytes(name, context)
        cdef bytes b_peer = ifname_bytes(peer_name, context)
        cdef char req[REQ_SIZE]
        cdef int off, linkinfo, data, peer, rc, nsfd = -1, owned = 0
        cdef uint32_t c_mtu = 0
        if mtu is not None:
            if not isinstance(mtu, int) or mtu <= 0 or mtu > 0xFFFFFFFF:
                raise NetlinkError(context, _errno.EINVAL)
            c_mtu = <uint32_t>mtu
        if peer_netns is not None:
            owned = ns_fd(peer_netns, &nsfd)
        try:
            off = put_hdr(req, RTM_NEWLINK,
                          NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            memset(req + off, 0, 16)
            off += 16
            off = put_str(req, off, IFLA_IFNAME, b_name, len(b_name))
            if c_mtu:
                off = put_u32(req, off, IFLA_MTU, c_mtu)
            off = put_u32(req, off, IFLA_NUM_TX_QUEUES, 1)
            off = put_u32(req, off, IFLA_NUM_RX_QUEUES, 1)
            linkinfo = off
            off += 4
            off = put_str(req, off, IFLA_INFO_KIND, b"veth", 4)
            data = off
            off += 4
            peer = off
            off += 4
            memset(req + off, 0, 16)  # the peer's ifinfomsg
            off += 16
            off = put_str(req, off, IFLA_IFNAME, b_peer, len(b_peer))
            if c_mtu:
                off = put_u32(req, off, IFLA_MTU, c_mtu)
            off = put_u32(req, off, IFLA_NUM_TX_QUEUES, 1)
            off = put_u32(req, off, IFLA_NUM_RX_QUEUES, 1)
            if nsfd >= 0:
                off = put_u32(req, off, IFLA_NET_NS_FD, <uint32_t>nsfd)
            wr16(req + peer + 2, VETH_INFO_PEER)
            end_nest(req, peer, off)
            wr16(req + data + 2, IFLA_INFO_DATA)
            end_nest(req, data, off)
            wr16(req + linkinfo + 2, IFLA_LINKINFO)
            end_nest(req, linkinfo, off)
            rc = self._xfer(req, off, P_NONE, None)
        finally:
            if owned:
                close(nsfd)
        if rc:
            raise NetlinkError(context, rc)
        link = self._getlink(0, b_name, context)
        if link is None:  # deleted by someone else in between
            raise NetlinkError(context, _errno.ENODEV)
        return link.index

    def link_del(self, name):
        """Delete the link ``name``; False when it did not exist."""
        cdef char req[REQ_SIZE]
        cdef int off, rc
        cdef bytes b = ifname_or_none(name)
        if b is None:
            return False
        off = put_hdr(req, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK)
        memset(req + off, 0, 16)
        off += 16
        off = put_str(req, off, IFLA_IFNAME, b, len(b))
        rc = self._xfer(req, off, P_NONE, None)
        if rc == _errno.ENODEV:
            return False
        if rc:
            raise NetlinkError(f"deleting link {name}", rc)
        return True

    def link_set(self, index, up=None, mtu=None, netns=None, name=None, group=None):
        """Set the link up/down, its MTU, its name and/or its group, or move
        it to ``netns``; all given changes go in one RTM_SETLINK.

        ``name`` renames the link (the kernel applies the rename before the
        up/down change of the same request; kernels that refuse to rename a
        link that is up answer EBUSY). ``group`` (1..2**32-1) puts the link
        in that link group (IFLA_GROUP), see ``link_del_group``.

        ``netns`` (a path such as ``/run/netns/NAME`` or an open fd of a
        network namespace) moves the link there: RTM_SETLINK with
        IFLA_NET_NS_FD; a path is opened O_RDONLY|O_CLOEXEC and closed
        again, an fd is left open. Errors name the link and the target
        ("moving link 7 to /run/netns/x: ..."); a missing path raises
        ENOENT before any request is sent. ``netns`` together with any
        other change raises EINVAL: the index means another link (or none)
        after the move, so set those with a handle opened in the target
        namespace. A veth peer is better created in its namespace directly
        (``veth_add(..., peer_netns=...)``): moving one afterwards costs far
        more kernel time.
        """
        cdef char req[REQ_SIZE]
        cdef int off, rc
        cdef int32_t c_index
        cdef uint32_t flags = 0, change = 0
        cdef bytes b_name = None
        cdef str context
        if netns is not None:
            if name is not None or group is not None:
                raise NetlinkError(f"moving link {index} to {target_label(netns)}",
                                   _errno.EINVAL,
                                   hint="rename or regroup with a handle opened in the "
                                        "target namespace after the move")
            self._link_move(index, up, mtu, netns)
            return
        context = f"setting link index {index}"
        if not isinstance(index, int) or index <= 0 or index > 0x7FFFFFFF:
            raise NetlinkError(context, _errno.ENODEV)
        if mtu is not None and (not isinstance(mtu, int) or mtu <= 0 or mtu > 0xFFFFFFFF):
            raise NetlinkError(context, _errno.EINVAL)
        if name is not None:
            context = f"renaming link index {index} to {name}"
            b_name = ifname_bytes(name, context)
        if group is not None and (not isinstance(group, int) or isinstance(group, bool)
                                  or group <= 0 or group > 0xFFFFFFFF):
            raise NetlinkError(f"setting the group of link index {index} to {group!r}",
                               _errno.EINVAL)
        c_index = <int32_t>index
        off = put_hdr(req, RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK)
        memset(req + off, 0, 16)
        if up is not None:
            change = IFF_UP
            flags = IFF_UP if up else 0
        memcpy(req + off + 4, &c_index, 4)
        wr32(req + off + 8, flags)
        wr32(req + off + 12, change)
        off += 16
        if mtu is not None:
            off = put_u32(req, off, IFLA_MTU, <uint32_t>mtu)
        if b_name is not None:
            off = put_str(req, off, IFLA_IFNAME, b_name, len(b_name))
        if group is not None:
            off = put_u32(req, off, IFLA_GROUP, <uint32_t>group)
        rc = self._xfer(req, off, P_NONE, None)
        if rc:
            raise NetlinkError(context, rc)

    def link_del_group(self, group):
        """Delete every link of link group ``group`` with one RTM_DELLINK
        (ifi_index 0 + IFLA_GROUP, as ``ip link del group N``): the kernel
        unregisters them as one batch (one ``unregister_netdevice_many()``,
        one set of RCU grace periods), and a veth takes its peer, wherever
        it is, with it. True when links were deleted, False when the group
        was empty. The kernel refuses the whole request (EOPNOTSUPP, nothing
        deleted) when a member cannot be deleted by rtnetlink. ``group`` 0
        (every link's default) raises EINVAL before anything is sent."""
        cdef char req[REQ_SIZE]
        cdef int off, rc
        cdef str context = f"deleting link group {group!r}"
        if not isinstance(group, int) or isinstance(group, bool) \
                or group <= 0 or group > 0xFFFFFFFF:
            raise NetlinkError(context, _errno.EINVAL)
        off = put_hdr(req, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK)
        memset(req + off, 0, 16)
        off += 16
        off = put_u32(req, off, IFLA_GROUP, <uint32_t>group)
        rc = self._xfer(req, off, P_NONE, None)
        if rc == _errno.ENODEV:
            return False
        if rc:
            raise NetlinkError(context, rc)
        return True

    cdef int _link_move(self, index, up, mtu, netns) except -1:
        cdef char req[REQ_SIZE]
        cdef int off, rc, nsfd = -1, owned = 0
        cdef int32_t c_index
        cdef str context = f"moving link {index} to {target_label(netns)}"
        if (not isinstance(index, int) or isinstance(index, bool)
                or index <= 0 or index > 0x7FFFFFFF):
            raise NetlinkError(context, _errno.ENODEV)
        if up is not None or mtu is not None:
            raise NetlinkError(context, _errno.EINVAL,
                               hint="set up/mtu with a handle opened in the "
                                    "target namespace after the move")
        c_index = <int32_t>index
        try:
            owned = ns_fd(netns, &nsfd)
        except NetlinkError as exc:
            raise NetlinkError(context, exc.errno) from None
        try:
            off = put_hdr(req, RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK)
            memset(req + off, 0, 16)
            memcpy(req + off + 4, &c_index, 4)
            off += 16
            off = put_u32(req, off, IFLA_NET_NS_FD, <uint32_t>nsfd)
            rc = self._xfer(req, off, P_NONE, None)
        finally:
            if owned:
                close(nsfd)
        if rc:
            raise NetlinkError(context, rc)
        return 0

    # -- addresses ------------------------------------------------------------

    cdef int _addr_req(self, int cmd, int flags, index, address, prefixlen,
                       int scope, bint nodad, str context) except -1:
        cdef char req[REQ_SIZE]
        cdef char ip[16]
        cdef int off, rc, family, alen
        cdef uint32_t c_index
        family = parse_ip(address, ip) if isinstance(address, str) else 0
        if family == 0:
            raise NetlinkError(context, _errno.EINVAL)
        alen = 16 if family == AF_INET6 else 4
        if not isinstance(prefixlen, int) or not 0 <= prefixlen <= alen * 8:
            raise NetlinkError(context, _errno.EINVAL)
        if not isinstance(index, int) or index <= 0 or index > 0x7FFFFFFF:
            raise NetlinkError(context, _errno.ENODEV)
        if scope < 0 or scope > 255:
            raise NetlinkError(context, _errno.EINVAL)
        c_index = <uint32_t>index
        off = put_hdr(req, cmd, flags)
        req[off] = <char>family
        req[off + 1] = <char>(<int>prefixlen)
        req[off + 2] = <char>(IFA_F_NODAD if nodad and family == AF_INET6 else 0)
        req[off + 3] = <char>scope
        wr32(req + off + 4, c_index)
        off += 8
        off = put_attr(req, off, IFA_LOCAL, ip, alen)
        off = put_attr(req, off, IFA_ADDRESS, ip, alen)
        if nodad and family == AF_INET6:
            off = put_u32(req, off, IFA_FLAGS, IFA_F_NODAD)
        rc = self._xfer(req, off, P_NONE, None)
        if rc:
            raise NetlinkError(context, rc)
        return 0

    def addr_add(self, index, address, prefixlen, scope=0, nodad=False):
        """Add ``address/prefixlen`` to the link ``index`` (EEXIST if there)."""
        self._addr_req(RTM_NEWADDR,
                       NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                       index, address, prefixlen, scope, nodad,
                       f"adding address {address}/{prefixlen} to link index {index}")

    def addr_del(self, index, address, prefixlen):
        self._addr_req(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK,
                       index, address, prefixlen, 0, False,
                       f"deleting address {address}/{prefixlen} from link index {index}")

    def addr_list(self, index=None, family=0):
        """Addresses (IPv4 and/or IPv6), optionally only of link ``index``."""
        cdef char req[REQ_SIZE]
        cdef int off = put_hdr(req, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP)
        cdef int f_index
        memset(req + off, 0, 8)
        if family not in (0, AF_INET, AF_INET6):
            raise NetlinkError("listing addresses", _errno.EAFNOSUPPORT)
        req[off] = <char>(<int>family)
        off += 8
        if index is None:
            f_index = -1
        elif not isinstance(index, int) or index <= 0 or index > 0x7FFFFFFF:
            return []
        else:
            f_index = <int>index
        return self._dump(req, off, P_ADDR, "listing addresses", f_index)

    # -- routes ---------------------------------------------------------------

    cdef int _route_req(self, int cmd, int flags, dst, prefixlen, oif, gateway,
                        table, protocol, int scope, int rtype,
                        str context, priority=None) except -1:
        cdef char req[REQ_SIZE]
        cdef char ip[16]
        cdef char gw[16]
        cdef int off, rc, family, alen
        cdef uint32_t c_table, c_oif
        family = parse_ip(dst, ip) if isinstance(dst, str) else 0
        if family == 0:
            raise NetlinkError(context, _errno.EINVAL)
        alen = 16 if family == AF_INET6 else 4
        if not isinstance(prefixlen, int) or not 0 <= prefixlen <= alen * 8:
            raise NetlinkError(context, _errno.EINVAL)
        if not isinstance(table, int) or table < 0 or table > 0xFFFFFFFF:
            raise NetlinkError(context, _errno.EINVAL)
        if not isinstance(protocol, int) or not 0 <= protocol <= 255:
            raise NetlinkError(context, _errno.EINVAL)
        if scope < 0 or scope > 255:
            raise NetlinkError(context, _errno.EINVAL)
        c_table = <uint32_t>table
        off = put_hdr(req, cmd, flags)
        req[off] = <char>family
        req[off + 1] = <char>(<int>prefixlen)
        req[off + 2] = 0                      # src_len
        req[off + 3] = 0                      # tos
        req[off + 4] = <char>(c_table if c_table < 256 else 0)
        req[off + 5] = <char>(<int>protocol)
        req[off + 6] = <char>scope
        req[off + 7] = <char>rtype
        wr32(req + off + 8, 0)
        off += 12
        off = put_u32(req, off, RTA_TABLE, c_table)
        if prefixlen:
            off = put_attr(req, off, RTA_DST, ip, alen)
        if oif is not None:
            if not isinstance(oif, int) or oif <= 0 or oif > 0x7FFFFFFF:
                raise NetlinkError(context, _errno.ENODEV)
            c_oif = <uint32_t>oif
            off = put_u32(req, off, RTA_OIF, c_oif)
        if gateway is not None:
            if (not isinstance(gateway, str)
                    or parse_ip(gateway, gw) != family):
                raise NetlinkError(context, _errno.EINVAL)
            off = put_attr(req, off, RTA_GATEWAY, gw, alen)
        if priority is not None:
            if not isinstance(priority, int) or not 0 <= priority <= 0xFFFFFFFF:
                raise NetlinkError(context, _errno.EINVAL)
            off = put_u32(req, off, RTA_PRIORITY, <uint32_t>priority)
        rc = self._xfer(req, off, P_NONE, None)
        return rc

    def route_add(self, dst, prefixlen, *, oif=None, gateway=None,
                  table=RT_TABLE_MAIN, protocol=RTPROT_STATIC, scope=0,
                  replace=False, route_type=RTN_UNICAST, priority=None):
        """Add (or with ``replace=True`` replace) a route; ``route_type`` is
        the rtm_type (unicast 1, blackhole 6, unreachable 7); ``priority``
        its metric (None: the kernel's default)."""
        cdef int rc
        if not isinstance(route_type, int) or not 1 <= route_type <= 11:
            verb = "replacing" if replace else "adding"
            raise NetlinkError(f"{verb} route {dst}/{prefixlen} to table {table}",
                               _errno.EINVAL)
        if replace:
            rc = self._route_req(RTM_NEWROUTE,
                                 NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                                 dst, prefixlen, oif, gateway, table, protocol,
                                 scope, <int>route_type,
                                 f"replacing route {dst}/{prefixlen} to table {table}",
                                 priority)
            if rc:
                raise NetlinkError(f"replacing route {dst}/{prefixlen} to table {table}", rc)
        else:
            rc = self._route_req(RTM_NEWROUTE,
                                 NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                                 dst, prefixlen, oif, gateway, table, protocol,
                                 scope, <int>route_type,
                                 f"adding route {dst}/{prefixlen} to table {table}",
                                 priority)
            if rc:
                raise NetlinkError(f"adding route {dst}/{prefixlen} to table {table}", rc)

    def route_del(self, dst, prefixlen, *, table=RT_TABLE_MAIN, oif=None,
                  protocol=None):
        """Delete a route; False when no such route exists."""
        cdef int rc
        rc = self._route_req(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK,
                             dst, prefixlen, oif, None, table,
                             0 if protocol is None else protocol,
                             RT_SCOPE_NOWHERE, 0,
                             f"deleting route {dst}/{prefixlen} from table {table}")
        if rc == _errno.ESRCH:
            return False
        if rc:
            raise NetlinkError(f"deleting route {dst}/{prefixlen} from table {table}", rc)
        return True

    def route_list(self, family=0, table=None, protocol=None, route_type=None):
        """Routes of both families (``family=0``) or one; optionally only
        those of one table, one protocol and/or one rtm_type."""
        cdef char req[REQ_SIZE]
        cdef int off = put_hdr(req, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP)
        memset(req + off, 0, 12)
        if family not in (0, AF_INET, AF_INET6):
            raise NetlinkError("listing routes", _errno.EAFNOSUPPORT)
        req[off] = <char>(<int>family)
        off += 12
        if table is not None and (not isinstance(table, int) or not 0 <= table <= 0x7FFFFFFF):
            return []
        if protocol is not None and (not isinstance(protocol, int) or not 0 <= protocol <= 255):
            return []
        routes = self._dump(req, off, P_ROUTE, "listing routes",
                            -1 if table is None else <int>table,
                            -1 if protocol is None else <int>protocol)
        if route_type is not None:
            routes = [r for r in routes if r[8] == route_type]
        return routes


def open_netlink(netns=None):
    """An rtnetlink handle inside ``netns`` (None, a path or an fd)."""
    return Netlink(netns)
