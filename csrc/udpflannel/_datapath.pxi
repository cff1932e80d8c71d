# Included by _engine.pyx: the data path as C functions over (eng_t, context). They
# hold no GIL and create no Python object, except where a context's `capture` flag
# sends output to a test's list instead of the fds (then they take the GIL).
#
# A context's `rt` is the route table its current burst reads: the loop mode and the
# single-packet API set it to the published table; a thread loads it after waking.

# ---- shared rules ---------------------------------------------------------------------

cdef inline int tx_drop(txctx_t *c, int reason) noexcept nogil:
    c.ctr[reason] += 1
    c.last_drop = reason
    return ACT_DROP


cdef inline int rx_drop(rxctx_t *c, int reason) noexcept nogil:
    c.ctr[reason] += 1
    c.last_drop = reason
    return ACT_DROP


cdef inline route_t *find(const eng_t *e, const rtab_t *t, uint32_t addr) noexcept nogil:
    cdef int32_t i
    if (addr & e.netmask) != e.net:
        return NULL
    i = htab_get(&t.by_subnet, (addr >> e.shift) << e.shift)
    return NULL if i < 0 else &t.routes[i]


cdef inline Py_ssize_t framing_bytes(const route_t *r) noexcept nogil:
    return HEADROOM if r.framing == FRAME_VXLAN else 0


cdef inline int gso_on(eng_t *e) noexcept nogil:
    return uf_load_int(&e.gso)


cdef void gso_failed(eng_t *e, uint64_t *ctr, long rc) noexcept nogil:
    """A UDP_SEGMENT send failed: the caller retries it as single datagrams. Only EIO
    means the kernel cannot segment here (wireguard-go's rule): then GSO is off for
    good (the daemon logs it). Anything else (EMSGSIZE or EINVAL when a path is
    narrower than a segment, a full buffer) concerns this send alone."""
    ctr[C_GSO_FALLBACK] += 1
    if rc == -EIO:
        uf_store_int(&e.gso, 0)


cdef inline void ip_decrement_ttl(uint8_t *ip) noexcept nogil:
    ip[8] -= 1
    _ip_checksum(ip, (ip[0] & 0x0F) * 4)


# ---- TUN -> UDP ---------------------------------------------------------------------

cdef int tx_fd(const eng_t *e, const route_t *r, const uint8_t *pkt, Py_ssize_t n) noexcept nogil:
    """The socket a packet to r leaves by (its outer source port)."""
    if r.framing == FRAME_UDP:
        return e.bare_fd
    if e.ntx == 0:
        return e.udp_fd
    return e.tx_fds[(<uint64_t>flow_hash(pkt, n) * <uint64_t>e.ntx) >> 32]


cdef int unroutable(txctx_t *c, const uint8_t *pkt, Py_ssize_t n, uint32_t dst) noexcept nogil:
    cdef eng_t *e = c.e
    cdef Py_ssize_t ihl = (pkt[0] & 0x0F) * 4, quoted
    cdef uint16_t frag = _be16(pkt + 6) & 0x1FFF
    cdef bint icmp_error = False
    cdef uint8_t *o = c.icmp
    if pkt[9] == 1 and n > ihl:
        icmp_error = pkt[ihl] in (ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT,
                                  ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB)
    if ((dst & e.netmask) != e.net or ihl < 20 or n < ihl or frag != 0 or icmp_error):
        return tx_drop(c, D_NO_ROUTE)
    quoted = ihl + 8 if n >= ihl + 8 else n
    memset(o, 0, 28)
    o[0] = 0x45
    _put16(o + 2, <uint16_t>(28 + quoted))
    o[8] = 64
    o[9] = 1
    # From the unreachable address itself: a local source (the TUN's own address,
    # flannel's choice) is dropped by the kernel as a martian, so the sender would
    # never learn; an address of an unleased subnet is never local and routes back
    # through the TUN, so reverse-path filtering accepts it too.
    _put32(o + 12, dst)
    memcpy(o + 16, pkt + 12, 4)
    o[20] = 3  # destination unreachable, code 0: net unreachable
    memcpy(o + 28, pkt, quoted)
    _store_native16(o + 22, ~uf_csum_fold(uf_csum_partial(o + 20, 8 + quoted, 0)))
    _store_native16(o + 10, ~uf_csum_fold(uf_csum_partial(o, 20, 0)))
    c.icmp_len = <int>(28 + quoted)
    c.ctr[C_ICMP] += 1
    return ACT_ICMP


cdef int encap_c(txctx_t *c, uint8_t *pkt, Py_ssize_t n, route_t **out) noexcept nogil:
    """pkt has HEADROOM writable bytes before it. On ACT_SEND the frame starts at
    pkt - framing_bytes(route); on ACT_ICMP the reply is in c.icmp."""
    cdef eng_t *e = c.e
    cdef uint8_t version = pkt[0] >> 4 if n > 0 else 0
    cdef uint32_t dst
    cdef route_t *r
    cdef uint8_t *h
    if version == 4 and n >= 20 and (pkt[0] & 0x0F) >= 5:
        dst = _be32(pkt + 16)
        r = find(e, c.rt, dst)
        if r == NULL:
            return unroutable(c, pkt, n, dst)
    elif version == 6 and n >= 40:
        return tx_drop(c, D_NO_ROUTE)  # the overlay carries IPv4 subnets only
    else:
        return tx_drop(c, D_BAD_PACKET)
    if r.framing == FRAME_UDP:
        if pkt[8] <= 1:  # flannel's proxy: TTL down by one, dropped when it reaches 0
            return tx_drop(c, D_TTL_EXPIRED)
        ip_decrement_ttl(pkt)
    else:
        h = pkt - HEADROOM
        memcpy(h, e.vxlan_hdr, 8)
        memcpy(h + 8, r.mac, 6)
        memcpy(h + 14, e.own_mac, 6)
        h[20] = 0x08
        h[21] = 0x00
    out[0] = r
    c.ctr[C_TX_PACKETS] += 1
    c.ctr[C_TX_BYTES] += n
    return ACT_SEND


cdef inline uint8_t *batch_slot(txctx_t *c) noexcept nogil:
    """Where the next packet goes: after the queued frames, HEADROOM bytes in."""
    if BBUF_SIZE - c.b_off < BUFSIZE + HEADROOM:
        flush_batch(c)
    return c.bbuf + c.b_off + HEADROOM


cdef void queue_packet(txctx_t *c, uint8_t *pkt, Py_ssize_t n) noexcept nogil:
    """Frame the packet at the batch slot in place and queue it (or answer ICMP)."""
    cdef route_t *r = NULL
    cdef int act = encap_c(c, pkt, n, &r), fd
    cdef uint8_t *frame
    cdef Py_ssize_t flen, fb
    if act == ACT_ICMP:
        tx_write_icmp(c)
        return
    if act != ACT_SEND:
        return
    fb = framing_bytes(r)
    frame = pkt - fb
    flen = n + fb
    fd = tx_fd(c.e, r, pkt, n)
    if c.b_count and (r != c.b_route or fd != c.b_fd
                      or (gso_on(c.e) and (flen > c.b_seg or c.b_closed))):
        flush_batch(c)  # the frame cannot join: send the others, then start anew
        memmove(c.bbuf, frame, flen)
        frame = c.bbuf
    if c.b_count == 0:
        c.b_route = r
        c.b_fd = fd
        c.b_hdr = fb
        c.b_seg = flen
        c.b_closed = False
    c.b_iov[c.b_count].iov_base = frame
    c.b_iov[c.b_count].iov_len = flen
    c.b_count += 1
    c.b_off = (frame - c.bbuf) + flen
    if flen < c.b_seg:
        c.b_closed = True  # UDP_SEGMENT: only the last datagram may be shorter
    if c.b_count == MAX_WINDOW or c.b_off + c.b_seg > UDP_MAX_PAYLOAD:
        flush_batch(c)


cdef void flush_batch(txctx_t *c) noexcept nogil:
    cdef int count = c.b_count, sent = 0, k
    cdef long rc
    if count == 0:
        return
    c.b_count = 0
    c.b_off = 0
    if c.capture:
        capture(c.owner, c.b_iov, count, 1)
        return
    if count == 1:
        sent = 1 if sendto(c.b_fd, c.b_iov[0].iov_base, c.b_iov[0].iov_len, 0,
                           <sockaddr *>&c.b_route.addr, sizeof(sockaddr_in)) >= 0 else 0
    else:
        if gso_on(c.e):  # queue_packet kept the sizes UDP_SEGMENT needs
            rc = uf_send_gso_iov(c.b_fd, c.b_iov, count, <uint16_t>c.b_seg, &c.b_route.addr)
            if rc >= 0:
                sent = count
            else:
                gso_failed(c.e, c.ctr, rc)
        if sent == 0:
            for k in range(count):
                c.tx_iov[2 * k] = c.b_iov[k]
                c.tx_iov[2 * k + 1].iov_base = NULL
                c.tx_iov[2 * k + 1].iov_len = 0
            rc = uf_send_many_iov(c.b_fd, c.tx_iov, count, &c.b_route.addr)
            sent = <int>rc if rc > 0 else 0
    for k in range(sent, count):  # exact counters: undo what did not leave
        c.ctr[C_TX_PACKETS] -= 1
        c.ctr[C_TX_BYTES] -= c.b_iov[k].iov_len - c.b_hdr
        c.ctr[D_SEND_ERROR] += 1


cdef void tun_read_vnet(txctx_t *c, uint8_t *pkt, Py_ssize_t n) noexcept nogil:
    """One read: virtio header at pkt - VNET, then the packet (at a batch slot)."""
    cdef uint8_t *v = pkt - VNET
    cdef Py_ssize_t plen = n - VNET
    cdef uint16_t gso_size, cstart, coff, csum
    if n < VNET:
        tx_drop(c, D_BAD_OFFLOAD)
        return
    memcpy(&gso_size, v + 4, 2)
    memcpy(&cstart, v + 6, 2)
    memcpy(&coff, v + 8, 2)
    if v[1] != 0:
        if v[1] != GSO_TCPV4 and v[1] != GSO_UDP_L4:  # ECN (0x80): TSO_ECN is not asked for
            tx_drop(c, D_BAD_OFFLOAD)
            return
        flush_batch(c)  # keep the order of packets on the wire
        send_segments(c, pkt, plen, gso_size, 6 if v[1] == GSO_TCPV4 else 17)
        return
    if v[0] & NEEDS_CSUM:
        if cstart >= plen or cstart + coff + 2 > plen:
            tx_drop(c, D_BAD_OFFLOAD)
            return
        # The field already holds the pseudo-header sum, so summing from csum_start to
        # the end and inverting gives the full checksum. A UDP checksum of 0 means
        # "none": its ones' complement twin FFFF is sent.
        csum = ~uf_csum_fold(uf_csum_partial(pkt + cstart, plen - cstart, 0))
        if csum == 0 and plen >= 20 and (pkt[0] >> 4) == 4 and pkt[9] == 17:
            csum = 0xFFFF
        _store_native16(pkt + cstart + coff, csum)
    queue_packet(c, pkt, plen)


cdef void send_segments(txctx_t *c, uint8_t *pkt, Py_ssize_t n, uint16_t mss,
                        uint8_t proto) noexcept nogil:
    """Cut a TCPv4 (proto 6) or UDPv4 (proto 17) super-packet into MSS-sized segments,
    each its own frame (VXLAN, or bare for udp framing) with fresh IPv4 id/length/
    checksum and TCP seq/flags/checksum or UDP length/checksum, and send them a window
    at a time (one UDP_SEGMENT call, or sendmmsg). Only the headers are written (into
    obuf); each frame's payload is an iovec into the read buffer."""
    cdef eng_t *e = c.e
    cdef Py_ssize_t ihl, thl, hlen, payload, stride, off, chunk, window_bytes, fb
    cdef uint16_t csum, ident
    cdef uint32_t seq
    cdef uint8_t flags
    cdef route_t *r
    cdef int i, k, count, window, sent, built, fd
    cdef uint8_t *f
    cdef uint8_t *ip
    cdef uint8_t *tcp
    if n < 28 or (pkt[0] >> 4) != 4:
        tx_drop(c, D_BAD_OFFLOAD)
        return
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < 20 or n < ihl + (20 if proto == 6 else 8) or pkt[9] != proto:
        tx_drop(c, D_BAD_OFFLOAD)
        return
    thl = (pkt[ihl + 12] >> 4) * 4 if proto == 6 else 8
    hlen = ihl + thl
    if (thl < (20 if proto == 6 else 8) or n < hlen or mss == 0
            or HEADROOM + hlen + mss > UDP_MAX_PAYLOAD):
        tx_drop(c, D_BAD_OFFLOAD)  # (a segment must fit one UDP datagram)
        return
    r = find(e, c.rt, _be32(pkt + 16))
    if r == NULL:
        if unroutable(c, pkt, n, _be32(pkt + 16)) == ACT_ICMP:
            tx_write_icmp(c)
        return
    fb = framing_bytes(r)
    if r.framing == FRAME_UDP:
        if pkt[8] <= 1:  # every segment carries the super-packet's TTL
            tx_drop(c, D_TTL_EXPIRED)
            return
        ip_decrement_ttl(pkt)
    fd = tx_fd(e, r, pkt, n)
    c.ctr[C_TX_SUPER] += 1
    payload = n - hlen
    count = <int>((payload + mss - 1) // mss) if payload > 0 else 1
    stride = fb + hlen + mss
    window = MAX_WINDOW
    if gso_on(e) and window > UDP_MAX_PAYLOAD // stride:
        window = <int>(UDP_MAX_PAYLOAD // stride)
    ident = _be16(pkt + 4)
    seq = _be32(pkt + ihl + 4) if proto == 6 else 0
    flags = pkt[ihl + 13] if proto == 6 else 0
    i = 0
    while i < count:
        k = 0
        window_bytes = 0
        while k < window and i + k < count:
            off = (i + k) * mss
            chunk = payload - off if payload - off < mss else mss
            if chunk < 0:
                chunk = 0
            f = c.obuf + k * (fb + hlen)
            if fb:
                memcpy(f, e.vxlan_hdr, 8)
                memcpy(f + 8, r.mac, 6)
                memcpy(f + 14, e.own_mac, 6)
                f[20] = 0x08
                f[21] = 0x00
            ip = f + fb
            tcp = ip + ihl
            memcpy(ip, pkt, hlen)
            _put16(ip + 2, <uint16_t>(hlen + chunk))
            _put16(ip + 4, <uint16_t>(ident + i + k))
            _ip_checksum(ip, ihl)
            if proto == 6:
                _put32(tcp + 4, seq + <uint32_t>off)
                if i + k != count - 1:
                    tcp[13] = flags & ~(TCP_FIN | TCP_PSH)
                _store_native16(tcp + 16, 0)
                _store_native16(tcp + 16, ~uf_csum_fold(uf_csum_partial(
                    pkt + hlen + off, chunk,
                    uf_csum_partial(tcp, thl, uf_pseudo4(ip, 6, <uint16_t>(thl + chunk))))))
            else:  # UDP: each datagram its own length and checksum (0 is sent as FFFF)
                _put16(tcp + 4, <uint16_t>(8 + chunk))
                _store_native16(tcp + 6, 0)
                csum = ~uf_csum_fold(uf_csum_partial(
                    pkt + hlen + off, chunk,
                    uf_csum_partial(tcp, 8, uf_pseudo4(ip, 17, <uint16_t>(8 + chunk)))))
                _store_native16(tcp + 6, csum if csum != 0 else 0xFFFF)
            c.tx_iov[2 * k].iov_base = f
            c.tx_iov[2 * k].iov_len = fb + hlen
            c.tx_iov[2 * k + 1].iov_base = pkt + hlen + off
            c.tx_iov[2 * k + 1].iov_len = chunk
            window_bytes += hlen + chunk
            k += 1
        built = k
        sent = send_window(c, r, fd, built, stride)
        c.ctr[C_TX_PACKETS] += sent
        if sent == built:
            c.ctr[C_TX_BYTES] += window_bytes
        else:  # count exactly what left: the first `sent` frames of the window
            for k in range(sent):
                c.ctr[C_TX_BYTES] += c.tx_iov[2 * k].iov_len - fb + c.tx_iov[2 * k + 1].iov_len
            c.ctr[D_SEND_ERROR] += built - sent
        i += built


cdef int send_window(txctx_t *c, route_t *r, int fd, int count, Py_ssize_t stride) noexcept nogil:
    """Send the `count` frames described by tx_iov; returns how many left."""
    cdef long rc
    cdef int k
    if c.capture:
        capture(c.owner, c.tx_iov, 2 * count, 2)
        return count
    if gso_on(c.e) and count > 1:
        rc = uf_send_gso_iov(fd, c.tx_iov, 2 * count, <uint16_t>stride, &r.addr)
        if rc >= 0:
            return count
        gso_failed(c.e, c.ctr, rc)
    rc = uf_send_many_iov(fd, c.tx_iov, count, &r.addr)
    return <int>rc if rc > 0 else 0


cdef void tx_write_icmp(txctx_t *c) noexcept nogil:
    """Our ICMP reply into the TUN (behind a zero virtio header with vnet_hdr)."""
    cdef int k = 0
    if c.e.vnet:
        c.plain_iov[0].iov_base = c.icmp - VNET
        memset(c.icmp - VNET, 0, VNET)
        c.plain_iov[0].iov_len = VNET + c.icmp_len
    else:
        c.plain_iov[0].iov_base = c.icmp
        c.plain_iov[0].iov_len = c.icmp_len
    write_tun(c.capture, c.owner, uf_load_int(&c.tun_fd), c.plain_iov, 1)


cdef int tun_burst(txctx_t *c, int budget, bint block) noexcept nogil:
    """Read up to `budget` packets from the TUN straight into the send batch, framing
    each in place; frames to one peer and socket leave together (one UDP_SEGMENT send
    when their sizes allow, else sendmmsg). The first read blocks when `block` (a
    thread), the rest never do. The batch is flushed before this returns. Reads done,
    or -errno if the TUN itself failed."""
    cdef int done = 0, err
    cdef long n
    cdef uint8_t *slot
    cdef uint8_t *into
    cdef size_t cap
    while done < budget:
        slot = batch_slot(c)
        into = slot - VNET if c.e.vnet else slot  # the virtio header lands just before
        cap = BUFSIZE - HEADROOM + (VNET if c.e.vnet else 0)
        if block and done == 0:
            n = read(c.tun_fd, into, cap)
            if n < 0:
                n = -errno
        else:
            n = uf_read_nowait(c.tun_fd, into, cap)
        if n < 0:
            if n == -EINTR:
                if block and done == 0:
                    break  # woken (maybe to stop): the caller looks at its flags
                continue
            if n != -EAGAIN:
                err = <int>-n
                flush_batch(c)
                return -err
            break
        if done == 0 and block:  # awake: the burst reads the table published now
            tx_begin(c)
        done += 1
        if c.e.vnet:
            tun_read_vnet(c, slot, n)
        else:
            queue_packet(c, slot, n)
    flush_batch(c)
    return done


cdef inline void tx_begin(txctx_t *c) noexcept nogil:
    uf_store_int(&c.t.active, 1)
    c.rt = <rtab_t *>uf_load_ptr(<void **>&c.e.rt)


# ---- UDP -> TUN ---------------------------------------------------------------------

cdef int decap_c(rxctx_t *c, uint8_t *d, Py_ssize_t n, uint32_t source,
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
    if memcmp(d + 8, e.own_mac, 6) != 0:
        return rx_drop(c, D_BAD_MAC)
    ethertype = _be16(d + 20)
    if ethertype == ETH_P_IP:
        return accept_inner(c, d + HEADROOM, n - HEADROOM, 4, source, False, plen)
    if ethertype == ETH_P_IPV6:
        return accept_inner(c, d + HEADROOM, n - HEADROOM, 6, source, False, plen)
    return rx_drop(c, D_BAD_ETHERTYPE)


cdef int decap_bare_c(rxctx_t *c, uint8_t *d, Py_ssize_t n, uint32_t source,
                      Py_ssize_t *plen) noexcept nogil:
    """A flanneld-udp datagram: the bare IP packet. On ACT_DELIVER it is d[:plen]."""
    if n < 20:
        return rx_drop(c, D_SHORT)
    return accept_inner(c, d, n, d[0] >> 4, source, True, plen)


cdef int accept_inner(rxctx_t *c, uint8_t *p, Py_ssize_t avail, int family, uint32_t source,
                      bint bare, Py_ssize_t *plen) noexcept nogil:
    """The inner packet's rules, whatever the framing: a well-formed IP header that
    fits, a known sender, IPv4, and an inner source that the sender may use."""
    cdef eng_t *e = c.e
    cdef Py_ssize_t ihl, total = 0
    cdef uint32_t inner_src
    cdef route_t *owner
    if family == 4:
        ihl = (p[0] & 0x0F) * 4
        total = _be16(p + 2)
        if (p[0] >> 4) != 4 or ihl < 20 or total < ihl or total > avail:
            return rx_drop(c, D_BAD_IP)
    elif family == 6:
        if avail < 40 or (p[0] >> 4) != 6 or 40 + _be16(p + 4) > avail:
            return rx_drop(c, D_BAD_IP)
    else:
        return rx_drop(c, D_BAD_IP)
    if htab_get(&c.rt.by_sender, source) <= 0:
        return rx_drop(c, D_UNKNOWN_SENDER)
    if family != 4:
        return rx_drop(c, D_IPV6)  # the overlay carries IPv4 only
    inner_src = _be32(p + 12)
    # A source inside the overlay must be the sender's own subnet (no node may speak
    # for another's pods); one outside it is routed traffic (a host address, an ICMP
    # error from a router), delivered unless strict_source.
    if e.strict_source or (inner_src & e.netmask) == e.net:
        owner = find(e, c.rt, inner_src)
        if owner == NULL or owner.public_ip != source:
            return rx_drop(c, D_SPOOFED)
    if bare:
        if p[8] <= 1:  # flannel's proxy: TTL down by one, dropped when it reaches 0
            return rx_drop(c, D_TTL_EXPIRED)
        ip_decrement_ttl(p)
    complete_partial_csum(c, p, total)
    plen[0] = total
    c.ctr[C_RX_PACKETS] += 1
    c.ctr[C_RX_BYTES] += total
    return ACT_DELIVER


cdef void complete_partial_csum(rxctx_t *c, uint8_t *p, Py_ssize_t total) noexcept nogil:
    """A kernel VXLAN sender on the same host (bridge, veth, hypervisor) hands over
    TCP/UDP packets whose checksum was never finished: CHECKSUM_PARTIAL travels with
    the buffer and the field holds only the pseudo-header sum, which a real NIC would
    have completed. Such a packet is finished here and counted; any other bad
    checksum is left for the kernel to drop (real corruption stays dropped)."""
    cdef Py_ssize_t ihl = (p[0] & 0x0F) * 4, l4 = total - ihl, off
    cdef uint8_t proto = p[9]
    cdef uint16_t field, pseudo, csum
    cdef uint64_t psum
    if (_be16(p + 6) & 0x3FFF) != 0:
        return  # a fragment: its L4 checksum covers the whole datagram
    if proto == 6 and l4 >= 20:
        off = 16
    elif proto == 17 and l4 >= 8:
        off = 6
    else:
        return
    field = _load_native16(p + ihl + off)
    psum = uf_pseudo4(p, proto, <uint16_t>l4)
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


cdef int udp_burst(rxctx_t *c, int budget, bint block) noexcept nogil:
    """Receive on the context's socket (VXLAN, or flanneld udp framing when `bare`):
    each read may hold several same-size datagrams (UDP_GRO), split by the reported
    size. The first read blocks when `block` (a thread), the rest never do. Reads
    done, or -errno if the socket itself failed."""
    cdef int done = 0, segsize = 0
    cdef long n
    cdef Py_ssize_t plen = 0, off, dl
    cdef sockaddr_in src
    cdef uint32_t source
    while done < budget:
        n = uf_recvmsg(c.fd, c.buf, BUFSIZE, &src, &segsize, &c.rx_ovfl,
                       0 if (block and done == 0) else MSG_DONTWAIT)
        if n < 0:
            if n == -EINTR:
                if block and done == 0:
                    break
                continue
            if n != -EAGAIN:
                return <int>n
            break
        if done == 0 and block:
            rx_begin(c)
        done += 1
        if segsize < 0:  # control data cut short: the GRO segment size is unknown
            rx_drop(c, D_TRUNCATED)
            continue
        if n == 0:
            rx_drop(c, D_SHORT)
            continue
        source = ntohl(src.sin_addr.s_addr)
        if segsize == 0 or segsize >= n:
            segsize = <int>n
        off = 0
        while off < n:
            dl = n - off if n - off < segsize else segsize
            if c.bare:
                if decap_bare_c(c, c.buf + off, dl, source, &plen) == ACT_DELIVER:
                    deliver(c, c.buf + off, plen)
            elif decap_c(c, c.buf + off, dl, source, &plen) == ACT_DELIVER:
                deliver(c, c.buf + off + HEADROOM, plen)
            off += segsize
        co_flush(c)
    return done


cdef inline void rx_begin(rxctx_t *c) noexcept nogil:
    uf_store_int(&c.t.active, 1)
    c.rt = <rtab_t *>uf_load_ptr(<void **>&c.e.rt)


cdef inline void deliver(rxctx_t *c, uint8_t *p, Py_ssize_t n) noexcept nogil:
    """A validated inner packet, still in the receive buffer."""
    if c.e.vnet:
        co_add(c, p, n)
    else:
        emit_plain(c, p, n, 1)


# ---- receive coalescing (rules: udpflannel/core/offload.py) --------------------------

cdef void co_add(rxctx_t *c, uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Merge p into the current run if it extends it, else flush and start anew. The
    run is kept as pointers into the receive buffer (no copy): its first packet, whose
    headers become the super-packet's, and one iovec per payload."""
    cdef uint8_t *g = c.co_first
    cdef Py_ssize_t thl, size
    cdef bint ok = (n >= 40 and p[0] == 0x45 and p[9] == 6 and (_be16(p + 6) & 0x3FFF) == 0
                    and _be16(p + 2) == n)
    if ok:
        thl = (p[32] >> 4) * 4
        ok = (thl >= 20 and 20 + thl < n and (p[33] & ~(TCP_ACK | TCP_PSH)) == 0
              and (p[33] & TCP_ACK) != 0
              and uf_csum_fold(uf_csum_partial(p + 20, n - 20,
                                               uf_pseudo4(p, 6, <uint16_t>(n - 20)))) == 0xFFFF)
    if not ok:
        co_flush(c)
        emit_plain(c, p, n, 1)
        return
    size = n - 20 - thl
    if (c.co_count and not c.co_closed and size <= c.co_mss and c.co_count < MAX_MERGE
            and p[1] == g[1] and p[8] == g[8] and (p[6] & 0x40) == (g[6] & 0x40)
            and memcmp(p + 12, g + 12, 12) == 0 and ((g[32] >> 4) * 4) == thl
            and memcmp(p + 40, g + 40, thl - 20) == 0
            and memcmp(p + 28, g + 28, 4) == 0
            and _be32(p + 24) == c.co_next_seq
            and c.co_len + size <= MAX_PACKET):
        c.co_count += 1
        c.rx_iov[c.co_count].iov_base = p + 20 + thl
        c.rx_iov[c.co_count].iov_len = size
        c.co_len += size
        c.co_next_seq += <uint32_t>size
        c.co_psh = (p[33] & TCP_PSH) != 0
        if size < c.co_mss or c.co_psh:
            c.co_closed = True
        return
    co_flush(c)
    c.co_first = p
    c.co_len = n
    c.co_count = 1
    c.rx_iov[1].iov_base = p + 20 + thl
    c.rx_iov[1].iov_len = size
    c.co_mss = <uint16_t>size
    c.co_next_seq = _be32(p + 24) + <uint32_t>size
    c.co_psh = (p[33] & TCP_PSH) != 0
    c.co_closed = c.co_psh


cdef void co_flush(rxctx_t *c) noexcept nogil:
    """Write the run: alone as it came, or as one GSO super-packet whose headers
    (virtio + IP + TCP, in cbuf) precede the payload iovecs."""
    cdef uint8_t *v = c.cbuf
    cdef uint8_t *g = c.cbuf + VNET
    cdef uint16_t hlen, x
    if c.co_count == 0:
        return
    if c.co_count == 1:
        emit_plain(c, c.co_first, c.co_len, 1)
        c.co_count = 0
        return
    hlen = <uint16_t>(20 + (c.co_first[32] >> 4) * 4)
    memcpy(g, c.co_first, hlen)
    _put16(g + 2, <uint16_t>c.co_len)
    _ip_checksum(g, 20)
    if c.co_psh:
        g[33] |= TCP_PSH
    # NEEDS_CSUM: the TCP field holds the folded pseudo-header sum
    _store_native16(g + 36, uf_csum_fold(uf_pseudo4(g, 6, <uint16_t>(c.co_len - 20))))
    v[0] = NEEDS_CSUM
    v[1] = GSO_TCPV4
    memcpy(v + 2, &hlen, 2)
    memcpy(v + 4, &c.co_mss, 2)
    x = 20
    memcpy(v + 6, &x, 2)
    x = 16
    memcpy(v + 8, &x, 2)
    c.rx_iov[0].iov_base = c.cbuf
    c.rx_iov[0].iov_len = VNET + hlen
    c.ctr[C_RX_MERGED] += 1
    emitv(c, c.rx_iov, c.co_count + 1, c.co_count,
          c.co_len + (c.co_count - 1) * hlen)  # what rx_bytes counted
    c.co_count = 0


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
    """Write one packet as is; with vnet_hdr behind an all-zero virtio header, gathered
    from its own buffer, so nothing in front of p is touched."""
    if c.e.vnet:
        c.plain_iov[0].iov_base = <void *>ZERO_VNET
        c.plain_iov[0].iov_len = VNET
        c.plain_iov[1].iov_base = p
        c.plain_iov[1].iov_len = n
        emitv(c, c.plain_iov, 2, packets, n * packets)
    else:
        c.plain_iov[0].iov_base = p
        c.plain_iov[0].iov_len = n
        emitv(c, c.plain_iov, 1, packets, n * packets)


cdef int write_tun(bint captures, void *owner, int tun_fd, iovec *iov, int iovcnt) noexcept nogil:
    """The one place that writes to the TUN (tests: the Engine's `captured` list)."""
    if captures:
        capture(owner, iov, iovcnt, iovcnt)
        return 0
    return <int>writev(tun_fd, iov, iovcnt)


cdef void capture(void *owner, iovec *iov, int iovcnt, int per_frame) noexcept with gil:
    """Tests only: append the frames in ``iov`` (``per_frame`` iovecs each) to the
    Engine's ``captured`` list instead of sending or writing them.

    A function of its own on purpose: a nogil function with a Python object local
    (even one used only under ``with gil``) makes Cython take the GIL at every exit
    to release it, so each hot-path call paid PyGILState_Ensure/Release (a thread
    state created and destroyed, and a wait for the GIL) on every packet."""
    captured = (<Engine>owner).captured
    for k in range(0, iovcnt, max(per_frame, 1)):
        captured.append(b"".join([(<uint8_t *>iov[j].iov_base)[:iov[j].iov_len]
                                  for j in range(k, k + per_frame)]))


# ---- threads ------------------------------------------------------------------------
# Each thread loops: block for the first packet, take the published route table, work
# through the burst, then go quiet (active = 0, seen = the generation it read), so the
# control thread knows when a retired table is no longer in anyone's hands.

cdef inline void go_quiet(thr_t *t, eng_t *e) noexcept nogil:
    uf_store_u64(&t.seen, uf_load_u64(&e.gen))
    uf_store_int(&t.active, 0)


cdef void *tx_thread(void *arg) noexcept nogil:
    cdef txctx_t *c = <txctx_t *>arg
    cdef int n
    while not uf_load_int(&c.t.stop):
        n = tun_burst(c, BUDGET, True)
        go_quiet(&c.t, c.e)
        if n < 0:
            c.t.error = -n
            break
    uf_store_int(&c.t.running, 0)
    uf_notify(c.e.notify_fd)
    return NULL


cdef void *rx_thread(void *arg) noexcept nogil:
    cdef rxctx_t *c = <rxctx_t *>arg
    cdef int n
    while not uf_load_int(&c.t.stop):
        n = udp_burst(c, BUDGET, True)
        go_quiet(&c.t, c.e)
        if n < 0:
            c.t.error = -n
            break
    uf_store_int(&c.t.running, 0)
    uf_notify(c.e.notify_fd)
    return NULL


cdef void *poll_thread(void *arg) noexcept nogil:
    """--io poll: one thread for both directions of a queue. It waits (epoll) until the
    TUN or one of the queue's sockets is readable and gives each ready one a burst,
    sockets first. What the kernel answers while packets are written to the TUN (a TCP
    receiver's ACKs, a ping reply) makes the TUN ready before the thread waits again,
    so it is read without the thread ever sleeping, where --io threads wakes a second
    thread for it (bench/RESULTS.md, "One thread per queue"). The context's table and
    quiescent state cover the sockets it drains."""
    cdef txctx_t *c = <txctx_t *>arg
    cdef rxctx_t *p
    cdef int fds[3]
    cdef int n = 1, k, r, rc, ep, ready = 0
    cdef bint failed = False
    fds[0] = c.tun_fd
    for k in range(2):
        if c.polled[k] != NULL:
            fds[n] = c.polled[k].fd
            n += 1
    ep = uf_waiter_open(fds, n)
    if ep < 0:
        c.t.error = -ep
        failed = True
    while not failed and not uf_load_int(&c.t.stop):
        rc = uf_waiter_wait(ep, &ready)
        if rc == -EINTR:
            continue  # woken, maybe to stop: the loop looks at the flag
        if rc < 0:
            c.t.error = -rc
            break
        tx_begin(c)
        for k in range(n - 1):
            if not ready & (2 << k):
                continue
            p = c.polled[k]
            p.rt = c.rt
            r = udp_burst(p, BUDGET, False)
            if r < 0:
                p.t.error = -r
                failed = True
                break
        if not failed and ready & 1:
            r = tun_burst(c, BUDGET, False)
            if r < 0:
                c.t.error = -r
                failed = True
        go_quiet(&c.t, c.e)
    if ep >= 0:
        close(ep)
    uf_store_int(&c.t.running, 0)
    uf_notify(c.e.notify_fd)
    return NULL
