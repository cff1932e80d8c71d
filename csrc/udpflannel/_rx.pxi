# Included by _engine.pyx: UDP -> TUN. Each receive call brings a batch of datagrams
# (recvmmsg, one slot of the receive buffer each), and each read may hold several
# same-size datagrams (UDP_GRO); each datagram is validated (decap_c for VXLAN,
# decap_bare_c for flanneld udp framing, accept_inner for the rules on the inner packet
# whatever the framing) and delivered from the receive buffer: with vnet_hdr, adjacent
# TCP segments of one flow are coalesced into one super-packet write (co_add /
# co_flush) across the whole batch, so a kernel without UDP GRO gets the same TUN
# writes as one with it; else each is written alone. Shared rules (drops, framing, TUN
# writes, threads) are in _datapath.pxi.

# ---- validating --------------------------------------------------------------------

cdef int decap_c(rxctx_t *c, uint8_t *d, Py_ssize_t n, uf_u128 source,
                 Py_ssize_t *plen) noexcept nogil:
    """A VXLAN datagram. On ACT_DELIVER the packet is d[HEADROOM : HEADROOM + plen]."""
    cdef eng_t *e = c.e
    cdef uint16_t ethertype
    if n < HEADROOM + IPV4_HLEN:
        return rx_drop(c, D_SHORT)
    if d[0] != 0x08 or d[1] != 0 or d[2] != 0 or d[3] != 0 or d[7] != 0:
        return rx_drop(c, D_BAD_FLAGS)
    if ((<uint32_t>d[4] << 16) | (<uint32_t>d[5] << 8) | d[6]) != e.vni:
        return rx_drop(c, D_BAD_VNI)
    ethertype = _be16(d + VXLAN_HLEN + 12)
    if ethertype != ETH_P_IP and ethertype != ETH_P_IPV6:
        return rx_drop(c, D_BAD_ETHERTYPE)
    # each family's frames go to its own VTEP MAC (flannel.<VNI>'s, flannel-v6.<VNI>'s)
    if memcmp(d + VXLAN_HLEN, <const uint8_t *>e.own_mac6 if ethertype == ETH_P_IPV6
              else <const uint8_t *>e.own_mac, 6) != 0:
        return rx_drop(c, D_BAD_MAC)
    return accept_inner(c, d + HEADROOM, n - HEADROOM, 6 if ethertype == ETH_P_IPV6 else 4,
                        source, False, plen)


cdef int decap_bare_c(rxctx_t *c, uint8_t *d, Py_ssize_t n, uf_u128 source,
                      Py_ssize_t *plen) noexcept nogil:
    """A flanneld-udp datagram: the bare IP packet. On ACT_DELIVER it is d[:plen]."""
    if n < 20:
        return rx_drop(c, D_SHORT)
    return accept_inner(c, d, n, d[0] >> 4, source, True, plen)


cdef int accept_inner(rxctx_t *c, uint8_t *p, Py_ssize_t avail, int family, uf_u128 source,
                      bint bare, Py_ssize_t *plen) noexcept nogil:
    """The inner packet's rules, whatever the framing: a well-formed IP header that
    fits, a known sender, a family the network carries (flanneld's udp framing: IPv4
    only), an inner source the sender may use and a destination in our subnet."""
    cdef eng_t *e = c.e
    cdef Py_ssize_t ihl = 0, total = 0
    if family == 4:
        ihl = (p[0] & 0x0F) * 4
        total = _be16(p + 2)
        if (p[0] >> 4) != 4 or ihl < 20 or total < ihl or total > avail:
            return rx_drop(c, D_BAD_IP)
    elif family == 6:
        if avail < IPV6_HLEN or (p[0] >> 4) != 6 or IPV6_HLEN + _be16(p + 4) > avail:
            return rx_drop(c, D_BAD_IP)
        total = IPV6_HLEN + _be16(p + 4)
    else:
        return rx_drop(c, D_BAD_IP)
    if htab_get(&c.rt.by_sender, source) <= 0:
        return rx_drop(c, D_UNKNOWN_SENDER)
    if family == 6:
        if not e.has6 or bare:
            return rx_drop(c, D_IPV6)
        if not inner6_allowed(c, p, source):
            return ACT_DROP
    elif not e.has4:
        return rx_drop(c, D_IPV4)
    elif not inner4_allowed(c, p, source):
        return ACT_DROP
    if bare:
        # flannel's proxy patches the header checksum (RFC 1624) when it lowers the
        # TTL, so a corrupt header stays corrupt; a fresh one would launder it: check first
        if uf_csum_fold(uf_csum_partial(p, ihl, 0)) != 0xFFFF:
            return rx_drop(c, D_BAD_IP)
        if not udp_framing_ttl(p):
            return rx_drop(c, D_TTL_EXPIRED)
    complete_partial_csum(c, p, total)
    plen[0] = total
    c.ctr[C_RX_PACKETS] += 1
    c.ctr[C_RX_BYTES] += total
    return ACT_DELIVER


cdef bint inner4_allowed(rxctx_t *c, const uint8_t *p, uf_u128 source) noexcept nogil:
    """A source inside the overlay must be the sender's own subnet (no node may speak
    for another's pods); one outside it is routed traffic (a host address, an ICMP
    error from a router), delivered unless strict_source. The destination must be a
    host of our subnet (not its broadcast address). False: dropped and counted."""
    cdef eng_t *e = c.e
    cdef uint32_t inner_src = _be32(p + 12), inner_dst = _be32(p + 16)
    cdef route_t *owner
    if e.strict_source or (inner_src & e.netmask) == e.net:
        owner = find(e, c.rt, inner_src)
        if owner == NULL or owner.public_ip != source:
            rx_drop(c, D_SPOOFED)
            return False
    if e.own_mask and ((inner_dst & e.own_mask) != e.own_net or inner_dst == (e.own_net | ~e.own_mask)):
        rx_drop(c, D_BAD_DESTINATION)
        return False
    return True


cdef bint inner6_allowed(rxctx_t *c, const uint8_t *p, uf_u128 source) noexcept nogil:
    """The same rules for IPv6 (no broadcast address there)."""
    cdef eng_t *e = c.e
    cdef uf_u128 inner_src = uf_load128(p + 8), inner_dst = uf_load128(p + 24)
    cdef route_t *owner
    if e.strict_source or in_net6(e, inner_src):
        owner = find6(e, c.rt, inner_src)
        if owner == NULL or owner.public_ip != source:
            rx_drop(c, D_SPOOFED)
            return False
    if e.own_mask6 and (inner_dst & e.own_mask6) != e.own_net6:
        rx_drop(c, D_BAD_DESTINATION)
        return False
    return True


cdef void complete_partial_csum(rxctx_t *c, uint8_t *p, Py_ssize_t total) noexcept nogil:
    """A kernel VXLAN sender on the same host (bridge, veth, hypervisor) hands over
    TCP/UDP packets whose checksum was never finished: CHECKSUM_PARTIAL travels with
    the buffer and the field holds only the pseudo-header sum, which a real NIC would
    have completed. Such a packet is finished here and counted; any other bad
    checksum is left for the kernel to drop (real corruption stays dropped). IPv6:
    only where TCP or UDP follows the fixed header directly."""
    cdef bint v6 = (p[0] >> 4) == 6
    cdef Py_ssize_t ihl = IPV6_HLEN if v6 else (p[0] & 0x0F) * 4, l4 = total - ihl, off
    cdef uint8_t proto = p[6] if v6 else p[9]
    cdef uint16_t field, pseudo, csum
    cdef uint64_t psum
    if not v6 and (_be16(p + 6) & 0x3FFF) != 0:
        return  # a fragment: its L4 checksum covers the whole datagram
    if proto == 6 and l4 >= 20:
        off = 16
    elif proto == 17 and l4 >= 8:
        off = 6
    else:
        return
    field = _load_native16(p + ihl + off)
    psum = uf_pseudo6(p, proto, <uint32_t>l4) if v6 else uf_pseudo4(p, proto, <uint16_t>l4)
    pseudo = uf_csum_fold(psum)
    if not (field == pseudo or (field == 0 and pseudo == 0xFFFF)
            or (field == 0xFFFF and pseudo == 0)):
        return
    if uf_csum_fold(uf_csum_partial(p + ihl, l4, psum)) == 0xFFFF:
        return  # the field happens to be right as it is
    # The field holds the pseudo-header sum: summing the L4 bytes completes it.
    csum = ~uf_csum_fold(uf_csum_partial(p + ihl, l4, 0))
    if csum == 0 and proto == 17:
        csum = 0xFFFF  # a UDP checksum of 0 means "none"
    _store_native16(p + ihl + off, csum)
    c.ctr[C_RX_CSUM_COMPLETED] += 1


# ---- receiving ---------------------------------------------------------------------

cdef int udp_burst(rxctx_t *c, int budget, bint block) noexcept nogil:
    """Receive on the context's socket (VXLAN, or flanneld udp framing when `bare`): a
    batch of reads per call (recvmmsg; one per call where the kernel lacks it), each
    read one datagram or several same-size ones (UDP_GRO). Segments are coalesced
    across the batch and written before the next call. The first call blocks when
    `block` (a thread), the rest never do. Reads done, or -errno if the socket itself
    failed."""
    cdef int done = 0, segsize = 0, got, k, vlen
    cdef long n
    cdef uf_sockaddr src
    cdef uf_rxbatch *b = c.batch
    while done < budget:
        if uf_load_int(&c.e.mmsg_rx):
            vlen = budget - done if budget - done < RX_BATCH else RX_BATCH
            got = uf_recvmmsg(c.fd, b, vlen, &c.rx_ovfl,
                              MSG_WAITFORONE if (block and done == 0) else MSG_DONTWAIT)
            if got == -ENOSYS:  # no recvmmsg here after all: one read per call from now on
                uf_store_int(&c.e.mmsg_rx, 0)
                continue
        else:
            vlen = 1
            n = uf_recvmsg(c.fd, c.buf, BUFSIZE, &src, &segsize, &c.rx_ovfl,
                           0 if (block and done == 0) else MSG_DONTWAIT)
            got = 1 if n >= 0 else <int>n
            b.len[0], b.segsize[0], b.src[0] = n, segsize, src
        if got < 0:
            if got == -EINTR:
                if block and done == 0:
                    break
                continue
            if got != -EAGAIN:
                return got
            break
        if done == 0 and block:
            rx_begin(c)
        done += got
        c.ctr[C_RX_CALLS] += 1
        for k in range(got):
            rx_read(c, c.buf + k * RX_SLOT, b.len[k], b.segsize[k], uf_addr_key(&b.src[k]))
        co_flush(c)
        if got < vlen:
            break  # the socket had no more: the next call would only say EAGAIN
    return done


cdef void rx_read(rxctx_t *c, uint8_t *buf, long n, int segsize, uf_u128 source) noexcept nogil:
    """One read: a datagram, or several same-size ones (GRO) split by the reported size."""
    cdef Py_ssize_t plen = 0, off = 0, dl
    if segsize < 0:  # control data cut short: the GRO segment size is unknown
        rx_drop(c, D_TRUNCATED)
        return
    if n == 0:
        rx_drop(c, D_SHORT)
        return
    if segsize == 0 or segsize >= n:
        segsize = <int>n
    while off < n:
        dl = n - off if n - off < segsize else segsize
        if c.bare:
            if decap_bare_c(c, buf + off, dl, source, &plen) == ACT_DELIVER:
                deliver(c, buf + off, plen)
        elif decap_c(c, buf + off, dl, source, &plen) == ACT_DELIVER:
            deliver(c, buf + off + HEADROOM, plen)
        off += segsize


cdef inline void rx_begin(rxctx_t *c) noexcept nogil:
    uf_store_int(&c.t.active, 1)
    c.rt = <rtab_t *>uf_load_ptr(<void **>&c.e.rt)


cdef inline void deliver(rxctx_t *c, uint8_t *p, Py_ssize_t n) noexcept nogil:
    """A validated inner packet, still in the receive buffer."""
    if c.e.vnet:
        co_add(c, p, n)
    else:
        emit_plain(c, p, n, 1)


# ---- receive coalescing (rules: udpflannel/core/offload.py) ------------------------

cdef inline Py_ssize_t tcp_at(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Where the TCP header of a segment that may merge starts: 20 (IPv4 without
    options, not a fragment) or 40 (IPv6 with TCP right after the fixed header), its
    IP length exactly n; 0 for anything else."""
    if n >= 40 and p[0] == 0x45 and p[9] == 6 and (_be16(p + 6) & 0x3FFF) == 0 and _be16(p + 2) == n:
        return IPV4_HLEN
    if n >= 60 and (p[0] >> 4) == 6 and p[6] == 6 and IPV6_HLEN + _be16(p + 4) == n:
        return IPV6_HLEN
    return 0


cdef inline bint same_ip_flow(const uint8_t *p, const uint8_t *g, Py_ssize_t h) noexcept nogil:
    """The IP fields a run keeps (its first packet's headers stand for all): IPv4 TOS,
    TTL, DF; IPv6 traffic class, flow label, hop limit; addresses and ports."""
    if h == IPV4_HLEN:
        return (g[0] == 0x45 and p[1] == g[1] and p[8] == g[8] and (p[6] & 0x40) == (g[6] & 0x40)
                and memcmp(p + 12, g + 12, 12) == 0)
    return (g[0] >> 4) == 6 and memcmp(p, g, 4) == 0 and p[7] == g[7] and memcmp(p + 8, g + 8, 36) == 0


cdef void co_add(rxctx_t *c, uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Merge p into the current run if it extends it, else flush and start anew. The
    run is kept as pointers into the receive buffer (no copy): its first packet, whose
    headers become the super-packet's, and one iovec per payload."""
    cdef uint8_t *g = c.co_first
    cdef Py_ssize_t h = tcp_at(p, n), thl = 0, size
    cdef uint8_t *t = p + h
    cdef bint ok = h != 0
    if ok:
        thl = (t[12] >> 4) * 4
        ok = (thl >= 20 and h + thl < n and (t[13] & ~(TCP_ACK | TCP_PSH)) == 0
              and (t[13] & TCP_ACK) != 0
              and uf_csum_fold(uf_csum_partial(t, n - h, uf_pseudo4(p, 6, <uint16_t>(n - h)) if h == IPV4_HLEN
                                               else uf_pseudo6(p, 6, <uint32_t>(n - h)))) == 0xFFFF)
    if not ok:
        co_flush(c)
        emit_plain(c, p, n, 1)
        return
    size = n - h - thl
    if (c.co_count and not c.co_closed and size <= c.co_mss and c.co_count < MAX_MERGE
            and same_ip_flow(p, g, h) and ((g[h + 12] >> 4) * 4) == thl
            and memcmp(t + 20, g + h + 20, thl - 20) == 0
            and memcmp(t + 8, g + h + 8, 4) == 0
            and _be32(t + 4) == c.co_next_seq
            and c.co_len + size <= MAX_PACKET):
        c.co_count += 1
        c.rx_iov[c.co_count].iov_base = t + thl
        c.rx_iov[c.co_count].iov_len = size
        c.co_len += size
        c.co_next_seq += <uint32_t>size
        c.co_psh = (t[13] & TCP_PSH) != 0
        if size < c.co_mss or c.co_psh:
            c.co_closed = True
        return
    co_flush(c)
    c.co_first = p
    c.co_len = n
    c.co_count = 1
    c.rx_iov[1].iov_base = t + thl
    c.rx_iov[1].iov_len = size
    c.co_mss = <uint16_t>size
    c.co_next_seq = _be32(t + 4) + <uint32_t>size
    c.co_psh = (t[13] & TCP_PSH) != 0
    c.co_closed = c.co_psh


cdef void co_flush(rxctx_t *c) noexcept nogil:
    """Write the run: alone as it came, or as one GSO super-packet whose headers
    (virtio + IP + TCP, in cbuf) precede the payload iovecs."""
    cdef uint8_t *v = c.cbuf
    cdef uint8_t *g = c.cbuf + VNET
    cdef uint16_t h, hlen, x
    if c.co_count == 0:
        return
    if c.co_count == 1:
        emit_plain(c, c.co_first, c.co_len, 1)
        c.co_count = 0
        return
    h = IPV4_HLEN if (c.co_first[0] >> 4) == 4 else IPV6_HLEN
    hlen = <uint16_t>(h + (c.co_first[h + 12] >> 4) * 4)
    memcpy(g, c.co_first, hlen)
    if c.co_psh:
        g[h + 13] |= TCP_PSH
    # NEEDS_CSUM: the TCP field holds the folded pseudo-header sum
    if h == IPV4_HLEN:
        _put16(g + 2, <uint16_t>c.co_len)
        _ip_checksum(g, IPV4_HLEN)
        _store_native16(g + h + 16, uf_csum_fold(uf_pseudo4(g, 6, <uint16_t>(c.co_len - h))))
        v[1] = GSO_TCPV4
    else:
        _put16(g + 4, <uint16_t>(c.co_len - h))  # the payload length
        _store_native16(g + h + 16, uf_csum_fold(uf_pseudo6(g, 6, <uint32_t>(c.co_len - h))))
        v[1] = GSO_TCPV6
    v[0] = NEEDS_CSUM
    memcpy(v + 2, &hlen, 2)
    memcpy(v + 4, &c.co_mss, 2)
    memcpy(v + 6, &h, 2)
    x = 16
    memcpy(v + 8, &x, 2)
    c.rx_iov[0].iov_base = c.cbuf
    c.rx_iov[0].iov_len = VNET + hlen
    c.ctr[C_RX_MERGED] += 1
    emitv(c, c.rx_iov, c.co_count + 1, c.co_count,
          c.co_len + (c.co_count - 1) * hlen)  # what rx_bytes counted
    c.co_count = 0


# ---- writing to the TUN ------------------------------------------------------------

cdef int emitv(rxctx_t *c, iovec *iov, int iovcnt, int packets, Py_ssize_t nbytes) noexcept nogil:
    """writev to the TUN; it carries `packets` delivered packets of `nbytes` bytes in
    all (undone from rx_* if it fails)."""
    if write_tun(c.capture, c.owner, uf_load_int(&c.tun_fd), iov, iovcnt) < 0:
        c.ctr[C_RX_PACKETS] -= packets
        c.ctr[C_RX_BYTES] -= nbytes
        c.ctr[D_TUN_WRITE_ERROR] += packets
        return -1
    return 0


cdef void emit_plain(rxctx_t *c, uint8_t *p, Py_ssize_t n, int packets) noexcept nogil:
    """Write one packet as is (plain_iov: behind a zero virtio header with vnet_hdr)."""
    emitv(c, c.plain_iov, plain_iov(c.e.vnet, c.plain_iov, p, n), packets, n * packets)



cdef void *rx_thread(void *arg) noexcept nogil:
    cdef rxctx_t *c = <rxctx_t *>arg
    cdef int n
    while not uf_load_int(&c.t.stop):
        n = udp_burst(c, BUDGET, True)
        go_quiet(&c.t, c.e)
        if n < 0:
            c.t.error = -n
            break
    thread_done(&c.t, c.e)
    return NULL
