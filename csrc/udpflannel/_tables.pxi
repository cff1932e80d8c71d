# Included by _engine.pyx: the route table's hash map, byte accessors and the flow
# hash. Module-level C functions; no Python objects on any path marked nogil.

# ---- hash map uf_u128 -> int32 ------------------------------------------------------
# Open addressing, linear probing, backward-shift deletion (no tombstones). Lookups
# cost the same with 1 or 100,000 peers. Keys are addresses of either family
# (netio.h: IPv4 in its mapped form). UF_EMPTY (all ones) marks a free slot, so it is
# never a key: no subnet has it, and set_route refuses it as a peer address.

cdef inline uint32_t _slot(uf_u128 key, uint32_t bits) noexcept nogil:
    return uf_slot(key, bits)


cdef int htab_init(htab *h, uint32_t bits) except -1:
    h.bits = bits
    h.count = 0
    h.keys = <uf_u128 *>malloc((<size_t>1 << bits) * sizeof(uf_u128))
    h.vals = <int32_t *>malloc((<size_t>1 << bits) * sizeof(int32_t))
    if h.keys == NULL or h.vals == NULL:
        raise MemoryError()
    memset(h.keys, 0xFF, (<size_t>1 << bits) * sizeof(uf_u128))
    return 0


cdef void htab_free(htab *h) noexcept:
    free(h.keys)
    free(h.vals)
    h.keys = NULL
    h.vals = NULL


cdef inline int32_t htab_get(const htab *h, uf_u128 key) noexcept nogil:
    cdef uint32_t mask = (1u << h.bits) - 1
    cdef uint32_t i = _slot(key, h.bits)
    while h.keys[i] != UF_EMPTY:
        if h.keys[i] == key:
            return h.vals[i]
        i = (i + 1) & mask
    return -1


cdef int htab_put(htab *h, uf_u128 key, int32_t val) except -1:
    cdef htab bigger
    cdef uint32_t i, mask
    if (h.count + 1) * 2 > (1u << h.bits):
        htab_init(&bigger, h.bits + 1)
        for i in range(1u << h.bits):
            if h.keys[i] != UF_EMPTY:
                htab_put(&bigger, h.keys[i], h.vals[i])
        htab_free(h)
        h[0] = bigger
    mask = (1u << h.bits) - 1
    i = _slot(key, h.bits)
    while h.keys[i] != UF_EMPTY and h.keys[i] != key:
        i = (i + 1) & mask
    if h.keys[i] == UF_EMPTY:
        h.count += 1
    h.keys[i] = key
    h.vals[i] = val
    return 0


cdef bint htab_del(htab *h, uf_u128 key) noexcept:
    cdef uint32_t mask = (1u << h.bits) - 1
    cdef uint32_t i = _slot(key, h.bits), j, home
    while h.keys[i] != key:
        if h.keys[i] == UF_EMPTY:
            return False
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if h.keys[j] == UF_EMPTY:
            break
        home = _slot(h.keys[j], h.bits)
        # move j back to i unless its home lies cyclically in (i, j]
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            h.keys[i] = h.keys[j]
            h.vals[i] = h.vals[j]
            i = j
    h.keys[i] = UF_EMPTY
    h.count -= 1
    return True


cdef int htab_copy(htab *dst, const htab *src) except -1:
    cdef size_t slots = <size_t>1 << src.bits
    dst.bits = src.bits
    dst.count = src.count
    dst.keys = <uf_u128 *>malloc(slots * sizeof(uf_u128))
    dst.vals = <int32_t *>malloc(slots * sizeof(int32_t))
    if dst.keys == NULL or dst.vals == NULL:
        free(dst.keys)
        free(dst.vals)
        raise MemoryError()
    memcpy(dst.keys, src.keys, slots * sizeof(uf_u128))
    memcpy(dst.vals, src.vals, slots * sizeof(int32_t))
    return 0


# ---- route tables -------------------------------------------------------------------

cdef rtab_t *rtab_new() except NULL:
    cdef rtab_t *t = <rtab_t *>calloc(1, sizeof(rtab_t))
    if t == NULL:
        raise MemoryError()
    t.cap = 16
    t.routes = <route_t *>calloc(t.cap, sizeof(route_t))
    if t.routes == NULL:
        free(t)
        raise MemoryError()
    htab_init(&t.by_subnet, 4)
    htab_init(&t.by_sender, 4)
    return t


cdef rtab_t *rtab_clone(const rtab_t *src) except NULL:
    cdef rtab_t *t = <rtab_t *>calloc(1, sizeof(rtab_t))
    if t == NULL:
        raise MemoryError()
    t.cap = src.cap
    t.n = src.n
    t.routes = <route_t *>malloc(t.cap * sizeof(route_t))
    if t.routes == NULL:
        free(t)
        raise MemoryError()
    memcpy(t.routes, src.routes, t.n * sizeof(route_t))
    htab_copy(&t.by_subnet, &src.by_subnet)
    htab_copy(&t.by_sender, &src.by_sender)
    return t


cdef void rtab_free(rtab_t *t) noexcept:
    if t != NULL:
        htab_free(&t.by_subnet)
        htab_free(&t.by_sender)
        free(t.routes)
        free(t)


cdef bint rtab_del(rtab_t *t, uf_u128 base) except -1:
    cdef int32_t i = htab_get(&t.by_subnet, base), n
    cdef uf_u128 ip
    if i < 0:
        return False
    ip = t.routes[i].public_ip
    htab_del(&t.by_subnet, base)
    t.n -= 1
    if i != t.n:  # keep the array dense: move the last route into the hole
        t.routes[i] = t.routes[t.n]
        htab_put(&t.by_subnet, t.routes[i].subnet, i)
    n = htab_get(&t.by_sender, ip)
    if n > 1:
        htab_put(&t.by_sender, ip, n - 1)
    else:
        htab_del(&t.by_sender, ip)
    return True


cdef int rtab_put(rtab_t *t, const route_t *r) except -1:
    cdef route_t *grown
    cdef int32_t n
    rtab_del(t, r.subnet)
    if t.n == t.cap:
        grown = <route_t *>realloc(t.routes, 2 * t.cap * sizeof(route_t))
        if grown == NULL:
            raise MemoryError()
        t.routes = grown
        t.cap *= 2
    t.routes[t.n] = r[0]
    htab_put(&t.by_subnet, r.subnet, t.n)
    n = htab_get(&t.by_sender, r.public_ip)
    htab_put(&t.by_sender, r.public_ip, (n if n > 0 else 0) + 1)
    t.n += 1
    return 0


# ---- byte helpers ------------------------------------------------------------------

cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint16_t _be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline void _put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


cdef inline void _put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void _store_native16(uint8_t *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)  # a checksum folded from native-order words goes back as is


cdef inline uint16_t _load_native16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline void _ip_checksum(uint8_t *ip, Py_ssize_t ihl) noexcept nogil:
    _store_native16(ip + 10, 0)
    _store_native16(ip + 10, ~uf_csum_fold(uf_csum_partial(ip, ihl, 0)))


# ---- flow hash (outer source port entropy, RFC 7348 section 5) ----------------------
# A fixed, unkeyed mix of the inner addresses, protocol and ports (no ports for
# fragments, so every fragment of a datagram takes one path). The pure twin computes
# the same value: udpflannel.core.frame.flow_hash.

cdef inline uint32_t _fmix32(uint32_t x) noexcept nogil:
    x ^= x >> 16
    x *= 0x85EBCA6Bu
    x ^= x >> 13
    x *= 0xC2B2AE35u
    x ^= x >> 16
    return x


cdef inline uint32_t flow_hash(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """p is an IPv4 packet of n >= 20 bytes, or an IPv6 one of n >= 40."""
    cdef Py_ssize_t ihl = (p[0] & 0x0F) * 4
    cdef uint32_t ports = 0
    cdef uint8_t proto = p[9]
    if (p[0] >> 4) == 6:
        return flow_hash6(p, n)
    if ((proto == 6 or proto == 17) and (_be16(p + 6) & 0x3FFF) == 0 and ihl >= 20
            and n >= ihl + 4):
        ports = _be32(p + ihl)
    return _fmix32(_fmix32(_fmix32(_be32(p + 12) ^ 0x9747B28Cu) ^ _be32(p + 16))
                   ^ ports ^ (<uint32_t>proto << 24))


cdef inline uint32_t flow_hash6(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """The same over an IPv6 packet's eight address words and next header; the ports
    only when the next header is TCP or UDP itself (no extension header between)."""
    cdef uint32_t h = 0x9747B28Cu, ports = 0
    cdef uint8_t nh = p[6]
    cdef int k
    for k in range(8):
        h = _fmix32(h ^ _be32(p + 8 + 4 * k))
    if (nh == 6 or nh == 17) and n >= 44:
        ports = _be32(p + 40)
    return _fmix32(h ^ ports ^ (<uint32_t>nh << 24))
