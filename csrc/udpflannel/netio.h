/* Small C helpers for the engine: Internet checksums and the batched UDP syscalls
 * (UDP GSO sends and GRO receives, and sendmmsg / recvmmsg where those are missing).
 *
 * Checksums are summed over native-order 32-bit words and folded; because the
 * Internet checksum is byte-order independent (RFC 1071), storing the folded value
 * in native order yields the right bytes on the wire.
 *
 * The socket calls return -errno instead of setting errno, so Cython's nogil code
 * can branch on the result without touching thread-local state twice.
 */
#ifndef UDPFLANNEL_NETIO_H
#define UDPFLANNEL_NETIO_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* Addresses of either family as one 128-bit number (host order), the key of the
 * route tables: an IPv6 address as it is, an IPv4 address in its IPv4-mapped form
 * (::ffff:a.b.c.d), so keys of the two families never meet. */
typedef unsigned __int128 uf_u128;

/* A destination or source of either family, as the socket calls take it. */
union uf_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
};

/* The route tables' free-slot marker: no subnet or node has the all-ones address. */
#define UF_EMPTY (~(uf_u128)0)

/* A key's slot in a table of 2^bits: its four 32-bit words folded, then
 * multiplicative hashing (the top bits of the product). */
static inline uint32_t uf_slot(uf_u128 key, uint32_t bits)
{
    uint32_t x = (uint32_t)key ^ (uint32_t)(key >> 32) ^ (uint32_t)(key >> 64) ^ (uint32_t)(key >> 96);
    return (x * 0x9E3779B1u) >> (32 - bits);
}

static inline socklen_t uf_sockaddr_len(const union uf_sockaddr *a)
{
    return a->sa.sa_family == AF_INET6 ? sizeof a->in6 : sizeof a->in4;
}

static inline uf_u128 uf_key4(uint32_t host_order)
{
    return ((uf_u128)0xffff << 32) | host_order;
}

/* 16 bytes in network order (an IPv6 address in a header) as a number. */
static inline uf_u128 uf_load128(const uint8_t *p)
{
    uint64_t hi, lo;
    memcpy(&hi, p, 8);
    memcpy(&lo, p + 8, 8);
    return ((uf_u128)__builtin_bswap64(hi) << 64) | __builtin_bswap64(lo);
}

static inline void uf_store128(uint8_t *p, uf_u128 v)
{
    uint64_t hi = __builtin_bswap64((uint64_t)(v >> 64)), lo = __builtin_bswap64((uint64_t)v);
    memcpy(p, &hi, 8);
    memcpy(p + 8, &lo, 8);
}

/* A received datagram's source as a route-table key (0 for an unknown family: no
 * node has that key). */
static inline uf_u128 uf_addr_key(const union uf_sockaddr *a)
{
    if (a->sa.sa_family == AF_INET)
        return uf_key4(ntohl(a->in4.sin_addr.s_addr));
    if (a->sa.sa_family == AF_INET6)
        return uf_load128(a->in6.sin6_addr.s6_addr);
    return 0;
}

static inline uint64_t uf_add_carry(uint64_t a, uint64_t b)
{
    a += b;
    return a + (a < b);  /* end-around carry keeps the one's complement sum exact */
}

static inline uint64_t uf_csum_partial(const uint8_t *p, size_t n, uint64_t sum)
{
    uint64_t a = 0, b = 0, c = 0, d = 0, w;
    while (n >= 32) {  /* four independent carry chains */
        memcpy(&w, p, 8);      a = uf_add_carry(a, w);
        memcpy(&w, p + 8, 8);  b = uf_add_carry(b, w);
        memcpy(&w, p + 16, 8); c = uf_add_carry(c, w);
        memcpy(&w, p + 24, 8); d = uf_add_carry(d, w);
        p += 32;
        n -= 32;
    }
    while (n >= 8) {
        memcpy(&w, p, 8);
        a = uf_add_carry(a, w);
        p += 8;
        n -= 8;
    }
    if (n >= 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        b = uf_add_carry(b, v);
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t h;
        memcpy(&h, p, 2);
        c = uf_add_carry(c, h);
        p += 2;
        n -= 2;
    }
    if (n) {
        uint16_t h = 0;
        memcpy(&h, p, 1);  /* the odd byte is the high-order byte in network order */
        d = uf_add_carry(d, h);
    }
    return uf_add_carry(uf_add_carry(uf_add_carry(uf_add_carry(a, b), c), d), sum);
}

/* Fold to 16 bits, not inverted (the "partial" form a NEEDS_CSUM field holds). */
static inline uint16_t uf_csum_fold(uint64_t sum)
{
    uint32_t x = (uint32_t)sum, y = (uint32_t)(sum >> 32);
    x += y;
    x += (x < y);
    x = (x & 0xffffu) + (x >> 16);
    x = (x & 0xffffu) + (x >> 16);
    return (uint16_t)x;
}

/* Sum of the IPv4 pseudo-header for protocol `proto` and L4 length `len`. */
static inline uint64_t uf_pseudo4(const uint8_t *iphdr, uint8_t proto, uint16_t len)
{
    uint8_t ph[12];
    memcpy(ph, iphdr + 12, 8);
    ph[8] = 0;
    ph[9] = proto;
    ph[10] = len >> 8;
    ph[11] = len & 0xff;
    return uf_csum_partial(ph, 12, 0);
}

/* Sum of the IPv6 pseudo-header (RFC 8200 section 8.1) for next header `proto`
 * and upper-layer length `len`. */
static inline uint64_t uf_pseudo6(const uint8_t *ip6, uint8_t proto, uint32_t len)
{
    uint8_t tail[8] = {len >> 24, (len >> 16) & 0xff, (len >> 8) & 0xff, len & 0xff, 0, 0, 0, proto};
    return uf_csum_partial(tail, 8, uf_csum_partial(ip6 + 8, 32, 0));
}

/* One UDP_SEGMENT send: the kernel cuts the gathered bytes every `segsize` bytes
 * into datagrams (the last may be shorter). Frames stay scattered: header and
 * payload are separate iovecs, so the payload is never copied in userspace. */
static inline long uf_send_gso_iov(int fd, struct iovec *iov, int iovcnt, uint16_t segsize,
                                   const union uf_sockaddr *dst)
{
    char control[CMSG_SPACE(sizeof(uint16_t))];
    struct msghdr msg;
    struct cmsghdr *cm;
    memset(&msg, 0, sizeof msg);
    memset(control, 0, sizeof control);
    msg.msg_name = (void *)dst;
    msg.msg_namelen = uf_sockaddr_len(dst);
    msg.msg_iov = iov;
    msg.msg_iovlen = iovcnt;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(cm), &segsize, sizeof segsize);
    long n = sendmsg(fd, &msg, 0);
    return n < 0 ? -errno : n;
}

/* `count` datagrams to one destination; datagram k is iov[2k] + iov[2k+1]. With
 * *mmsg set they leave by sendmmsg (64 per call); a kernel without it (ENOSYS, Linux
 * < 3.0, or a seccomp profile) clears *mmsg for good and they go one sendmsg each.
 * Returns how many were sent, or -errno if none was; *calls counts the calls that
 * sent something. */
#define UF_MMSG_MAX 64
static inline long uf_send_many_iov(int fd, struct iovec *iov, int count,
                                    const union uf_sockaddr *dst, int *mmsg, uint64_t *calls)
{
    struct mmsghdr msgs[UF_MMSG_MAX];
    int sent = 0;
    while (sent < count && __atomic_load_n(mmsg, __ATOMIC_RELAXED)) {
        int batch = count - sent > UF_MMSG_MAX ? UF_MMSG_MAX : count - sent;
        memset(msgs, 0, sizeof(struct mmsghdr) * batch);
        for (int i = 0; i < batch; i++) {
            msgs[i].msg_hdr.msg_iov = iov + 2 * (sent + i);
            msgs[i].msg_hdr.msg_iovlen = 2;
            msgs[i].msg_hdr.msg_name = (void *)dst;
            msgs[i].msg_hdr.msg_namelen = uf_sockaddr_len(dst);
        }
        int n = sendmmsg(fd, msgs, batch, 0);
        if (n < 0 && errno == ENOSYS) {
            __atomic_store_n(mmsg, 0, __ATOMIC_RELAXED);
            break;
        }
        if (n <= 0)
            return sent ? sent : -errno;
        *calls += 1;
        sent += n;
    }
    while (sent < count) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov + 2 * sent;
        msg.msg_iovlen = 2;
        msg.msg_name = (void *)dst;
        msg.msg_namelen = uf_sockaddr_len(dst);
        if (sendmsg(fd, &msg, 0) < 0)
            return sent ? sent : -errno;
        *calls += 1;
        sent++;
    }
    return sent;
}

/* Whether this kernel has sendmmsg and recvmmsg (a call with no message costs
 * nothing and answers ENOSYS where they are missing). */
static inline int uf_have_mmsg(int fd)
{
    return sendmmsg(fd, NULL, 0, MSG_DONTWAIT) >= 0 && recvmmsg(fd, NULL, 0, MSG_DONTWAIT, NULL) >= 0;
}

#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

/* Room for every control message we ask for (UDP_GRO's int, SO_RXQ_OVFL's u32) and
 * then some, aligned for struct cmsghdr as CMSG_* require. */
union uf_cmsg_space {
    char buf[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(uint32_t)) + 64];
    struct cmsghdr align;
};

/* One recvmsg. *segsize: the GRO segment size (0 when the read is one datagram),
 * or -1 when the kernel had to cut the control data (MSG_CTRUNC): then the segment
 * size is unknown and the caller must not split the read. *ovfl: the socket's
 * kernel drop count when SO_RXQ_OVFL is on (left alone otherwise). flags: 0 (blocks
 * on a blocking socket) or MSG_DONTWAIT. */
static inline long uf_recvmsg(int fd, uint8_t *buf, size_t cap, union uf_sockaddr *src,
                              int *segsize, uint32_t *ovfl, int flags)
{
    struct iovec iov = {buf, cap};
    union uf_cmsg_space control;
    struct msghdr msg;
    struct cmsghdr *cm;
    memset(&msg, 0, sizeof msg);
    msg.msg_name = src;
    msg.msg_namelen = sizeof *src;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    long n = recvmsg(fd, &msg, flags);
    if (n < 0)
        return -errno;
    *segsize = 0;
    if (msg.msg_flags & MSG_CTRUNC) {
        *segsize = -1;
        return n;
    }
    for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO)
            memcpy(segsize, CMSG_DATA(cm), sizeof(int));
        else if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL)
            memcpy(ovfl, CMSG_DATA(cm), sizeof(uint32_t));
    }
    return n;
}

/* recvmmsg's arrays for one socket: datagram (or GRO read) i lands in iov[i]. */
#define UF_RX_BATCH 64
struct uf_rxbatch {
    struct mmsghdr msgs[UF_RX_BATCH];
    struct iovec iov[UF_RX_BATCH];
    union uf_sockaddr src[UF_RX_BATCH];
    union uf_cmsg_space ctl[UF_RX_BATCH];
    int segsize[UF_RX_BATCH];  /* as uf_recvmsg's *segsize */
    long len[UF_RX_BATCH];
};

/* Message i is received into base + i * stride, at most cap bytes. */
static inline void uf_rxbatch_init(struct uf_rxbatch *b, uint8_t *base, size_t stride, size_t cap)
{
    memset(b, 0, sizeof *b);
    for (int i = 0; i < UF_RX_BATCH; i++) {
        b->iov[i].iov_base = base + i * stride;
        b->iov[i].iov_len = cap;
        b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
        b->msgs[i].msg_hdr.msg_name = &b->src[i];
    }
}

/* One recvmmsg of up to vlen (<= UF_RX_BATCH) messages: each one's length, source,
 * GRO segment size (as uf_recvmsg) and the socket's drop count (*ovfl). flags:
 * MSG_WAITFORONE (block for the first on a blocking socket) or MSG_DONTWAIT. How
 * many were received, or -errno. */
static inline int uf_recvmmsg(int fd, struct uf_rxbatch *b, int vlen, uint32_t *ovfl, int flags)
{
    struct cmsghdr *cm;
    int n, i;
    for (i = 0; i < vlen; i++) {
        b->msgs[i].msg_hdr.msg_namelen = sizeof b->src[i];
        b->msgs[i].msg_hdr.msg_control = b->ctl[i].buf;
        b->msgs[i].msg_hdr.msg_controllen = sizeof b->ctl[i].buf;
        b->msgs[i].msg_hdr.msg_flags = 0;
    }
    n = recvmmsg(fd, b->msgs, vlen, flags, NULL);
    if (n < 0)
        return -errno;
    for (i = 0; i < n; i++) {
        struct msghdr *msg = &b->msgs[i].msg_hdr;
        b->len[i] = b->msgs[i].msg_len;
        b->segsize[i] = 0;
        if (msg->msg_flags & MSG_CTRUNC) {
            b->segsize[i] = -1;
            continue;
        }
        for (cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
            if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO)
                memcpy(&b->segsize[i], CMSG_DATA(cm), sizeof(int));
            else if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL)
                memcpy(ovfl, CMSG_DATA(cm), sizeof(uint32_t));
        }
    }
    return n;
}

#endif
