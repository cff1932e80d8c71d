# Included by _engine.pyx: the route table's hash map, byte accessors and the flow
# hash. Module-level C functions; no Python objects on any path marked nogil.

# ---- hash map uint32 -> int32 ------------------------------------------------------
# Open addressing, linear probing, backward-shift deletion (no tombstones). Lookups
# cost the same with 1 or 100,000 peers. EMPTY marks a free slot, so it is never a key
# (set_route refuses 255.255.255.255 as a peer address for that reason too).

cdef uint32_t EMPTY = 0xFFFFFFFFu


cdef inline uint32_t _slot(uint32_t key, uint32_t bits) noexcept nogil:
    return (key * <uint32_t>0x9E3779B1u) >> (32 - bits)


cdef int htab_init(htab *h, uint32_t bits) except -1:
    h.bits = bits
    h.count = 0
    h.keys = <uint32_t *>malloc((<size_t>1 << bits) * sizeof(uint32_t))
    h.vals = <int32_t *>malloc((<size_t>1 << bits) * sizeof(int32_t))
    if h.keys == NULL or h.vals == NULL:
        raise MemoryError()
    memset(h.keys, 0xFF, (<size_t>1 << bits) * sizeof(uint32_t))
    return 0


cdef void htab_free(htab *h) noexcept:
    free(h.keys)
    free(h.vals)
    h.keys = NULL
    h.vals = NULL


cdef inline int32_t htab_get(const htab *h, uint32_t key) noexcept nogil:
    cdef uint32_t mask = (1u << h.bits) - 1
    cdef uint32_t i = _slot(key, h.bits)
    while h.keys[i] != EMPTY:
        if h.keys[i] == key:
            return h.vals[i]
        i = (i + 1) & mask
    return -1


cdef int htab_put(htab *h, uint32_t key, int32_t val) except -1:
    cdef htab bigger
    cdef uint32_t i, mask
    if (h.count + 1) * 2 > (1u << h.bits):
        htab_init(&bigger, h.bits + 1)
        for i in range(1u << h.bits):
            if h.keys[i] != EMPTY:
                htab_put(&bigger, h.keys[i], h.vals[i])
        htab_free(h)
        h[0] = bigger
    mask = (1u << h.bits) - 1
    i = _slot(key, h.bits)
    while h.keys[i] != EMPTY and h.keys[i] != key:
        i = (i + 1) & mask
    if h.keys[i] == EMPTY:
        h.count += 1
    h.keys[i] = key
    h.vals[i] = val
    return 0


cdef bint htab_del(htab *h, uint32_t key) noexcept:
    cdef uint32_t mask = (1u << h.bits) - 1
    cdef uint32_t i = _slot(key, h.bits), j, home
    while h.keys[i] != key:
        if h.keys[i] == EMPTY:
            return False
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if h.keys[j] == EMPTY:
            break
        home = _slot(h.keys[j], h.bits)
        # move j back to i unless its home lies cyclically in (i, j]
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            h.keys[i] = h.keys[j]
            h.vals[i] = h.vals[j]
            i = j
    h.keys[i] = EMPTY
    h.count -= 1
    return True


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
    """p is an IPv4 packet of n >= 20 bytes."""
    cdef Py_ssize_t ihl = (p[0] & 0x0F) * 4
    cdef uint32_t ports = 0
    cdef uint8_t proto = p[9]
    if ((proto == 6 or proto == 17) and (_be16(p + 6) & 0x3FFF) == 0 and ihl >= 20
            and n >= ihl + 4):
        ports = _be32(p + ihl)
    return _fmix32(_fmix32(_fmix32(_be32(p + 12) ^ 0x9747B28Cu) ^ _be32(p + 16))
                   ^ ports ^ (<uint32_t>proto << 24))
