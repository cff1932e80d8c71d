# Included by _engine.pyx: TUN -> UDP. Each read lands in the send batch with HEADROOM
# bytes in front and is framed in place (encap_c); frames to one peer and socket leave
# together (queue_packet / flush_batch: one UDP_SEGMENT send, else sendmmsg: a burst of
# reads costs one send call per peer and socket, not one per packet, on kernels without
# UDP GSO too; up to TX_GROUPS such groups fill at once, so many flows to one peer
# spread over the source-port sockets still leave in few calls). With vnet_hdr a read may be a TSO super-packet, cut into segments whose headers
# are written apart and whose payloads stay in the read buffer (send_segments), all of
# them in one call (UDP_SEGMENT, else sendmmsg). No route
# inside the overlay: an ICMP net unreachable back into the TUN. Shared rules (drops,
# framing, TUN writes, threads) are in _datapath.pxi.

# ---- framing and sending -----------------------------------------------------------

cdef inline void put_vxlan_headers(const eng_t *e, const route_t *r, uint8_t *h) noexcept nogil:
    """The HEADROOM bytes in front of an inner packet bound for r: the VXLAN header (our
    VNI), then the inner Ethernet header from our VtepMAC to the peer's, those of the
    route's family (IPv6: the flannel-v6 MACs) with its ethertype."""
    cdef uint16_t ethertype = ETH_P_IPV6 if r.family == 6 else ETH_P_IP
    memcpy(h, e.vxlan_hdr, VXLAN_HLEN)
    memcpy(h + VXLAN_HLEN, r.mac, 6)
    memcpy(h + VXLAN_HLEN + 6, <const uint8_t *>e.own_mac6 if r.family == 6 else <const uint8_t *>e.own_mac, 6)
    h[VXLAN_HLEN + 12] = ethertype >> 8
    h[VXLAN_HLEN + 13] = ethertype & 0xFF


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


cdef int tx_fd(const eng_t *e, const route_t *r, const uint8_t *pkt, Py_ssize_t n) noexcept nogil:
    """The socket a packet to r leaves by (its outer source port)."""
    if r.framing == FRAME_UDP:
        return e.bare_fd
    if r.outer6:
        if e.ntx6 == 0:
            return e.udp6_fd
        return e.tx6_fds[(<uint64_t>flow_hash(pkt, n) * <uint64_t>e.ntx6) >> 32]
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
    if (not e.has4 or (dst & e.netmask) != e.net or ihl < 20 or n < ihl or frag != 0
            or icmp_error):
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


cdef int unreachable6(txctx_t *c, const uint8_t *pkt, Py_ssize_t n, uf_u128 dst) noexcept nogil:
    """No route for an IPv6 packet: inside the IPv6 network, an ICMPv6 destination
    unreachable (type 1, code 0: no route) back into the TUN, quoting as much of the
    packet as fits the minimum MTU (RFC 4443 section 3.1); never in reply to an ICMPv6
    error (a next header of 58 with a type below 128) or to a source that cannot be
    answered (unspecified, multicast). Else a counted drop. From the unreachable
    address itself, as for IPv4."""
    cdef uint8_t *o = c.icmp
    cdef Py_ssize_t quoted = n if n < ICMP6_QUOTE_MAX else ICMP6_QUOTE_MAX
    cdef bint icmp_error = pkt[6] == 58 and n > 40 and pkt[40] < 128
    if not in_net6(c.e, dst) or icmp_error or pkt[8] == 0xFF or uf_load128(pkt + 8) == 0:
        return tx_drop(c, D_NO_ROUTE)
    memset(o, 0, 48)
    o[0] = 0x60
    _put16(o + 4, <uint16_t>(8 + quoted))
    o[6] = 58
    o[7] = 64
    memcpy(o + 8, pkt + 24, 16)
    memcpy(o + 24, pkt + 8, 16)
    o[40] = 1  # destination unreachable, code 0: no route to destination
    memcpy(o + 48, pkt, quoted)
    _store_native16(o + 42, ~uf_csum_fold(uf_csum_partial(
        o + 40, 8 + quoted, uf_pseudo6(o, 58, <uint32_t>(8 + quoted)))))
    c.icmp_len = <int>(48 + quoted)
    c.ctr[C_ICMP] += 1
    return ACT_ICMP


cdef int encap_c(txctx_t *c, uint8_t *pkt, Py_ssize_t n, route_t **out) noexcept nogil:
    """pkt has HEADROOM writable bytes before it. On ACT_SEND the frame starts at
    pkt - framing_bytes(route); on ACT_ICMP the reply is in c.icmp."""
    cdef eng_t *e = c.e
    cdef uint8_t version = pkt[0] >> 4 if n > 0 else 0
    cdef uint32_t dst
    cdef uf_u128 dst6
    cdef route_t *r
    if version == 4 and n >= 20 and (pkt[0] & 0x0F) >= 5:
        dst = _be32(pkt + 16)
        r = find(e, c.rt, dst)
        if r == NULL:
            return unroutable(c, pkt, n, dst)
    elif version == 6 and n >= 40:
        dst6 = uf_load128(pkt + 24)
        r = find6(e, c.rt, dst6)
        if r == NULL:
            return unreachable6(c, pkt, n, dst6)
    else:
        return tx_drop(c, D_BAD_PACKET)
    if r.framing == FRAME_UDP:
        if not udp_framing_ttl(pkt):
            return tx_drop(c, D_TTL_EXPIRED)
    else:
        put_vxlan_headers(e, r, pkt - HEADROOM)
    out[0] = r
    c.ctr[C_TX_PACKETS] += 1
    c.ctr[C_TX_BYTES] += n
    return ACT_SEND


# ---- the send batch (one packet per TUN read) --------------------------------------

cdef inline uint8_t *batch_slot(txctx_t *c) noexcept nogil:
    """Where the next packet goes: after the queued frames, HEADROOM bytes in."""
    if BBUF_SIZE - c.b_off < BUFSIZE + HEADROOM:
        flush_batch(c)
    return c.bbuf + c.b_off + HEADROOM


cdef txgroup_t *batch_group(txctx_t *c, route_t *r, int fd) noexcept nogil:
    """The batch's group for frames to r by fd, or NULL: a batch of many flows to one
    peer, spread over the source-port sockets, leaves in one call per socket instead
    of one per change of socket (a flow keeps one socket, so its order holds)."""
    cdef int k
    for k in range(c.b_groups):
        if c.groups[k].route == r and c.groups[k].fd == fd:
            return &c.groups[k]
    return NULL


cdef void queue_packet(txctx_t *c, uint8_t *pkt, Py_ssize_t n) noexcept nogil:
    """Frame the packet at the batch slot in place and queue it (or answer ICMP)."""
    cdef route_t *r = NULL
    cdef int act = encap_c(c, pkt, n, &r), fd
    cdef uint8_t *frame
    cdef Py_ssize_t flen, fb
    cdef txgroup_t *g
    if act == ACT_ICMP:
        tx_write_icmp(c)
        return
    if act != ACT_SEND:
        return
    fb = framing_bytes(r)
    frame = pkt - fb
    flen = n + fb
    fd = tx_fd(c.e, r, pkt, n)
    g = batch_group(c, r, fd)
    if g != NULL and g.count and gso_on(c.e) and (flen > g.seg or g.closed):
        flush_group(c, g)  # the frame cannot join its group: send the group first
    if g == NULL:
        if c.b_groups == TX_GROUPS:
            flush_batch(c)  # every group taken: send them all, then start anew
            memmove(c.bbuf, frame, flen)
            frame = c.bbuf
        g = &c.groups[c.b_groups]
        c.b_groups += 1
        g.route = r
        g.fd = fd
        g.count = 0
    if g.count == 0:
        g.hdr = fb
        g.seg = flen
        g.nbytes = 0
        g.closed = False
    g.iov[g.count].iov_base = frame
    g.iov[g.count].iov_len = flen
    g.count += 1
    g.nbytes += flen
    c.b_off = (frame - c.bbuf) + flen
    if flen < g.seg:
        g.closed = True  # UDP_SEGMENT: only the last datagram may be shorter
    if g.count == MAX_WINDOW or (gso_on(c.e) and g.nbytes + g.seg > UDP_MAX_PAYLOAD):
        flush_group(c, g)  # (sendmmsg has no byte limit: batch_slot keeps room for the next read)


cdef void flush_batch(txctx_t *c) noexcept nogil:
    """Send every group of the batch; the batch's buffer is free again."""
    cdef int k
    for k in range(c.b_groups):
        flush_group(c, &c.groups[k])
    c.b_groups = 0
    c.b_off = 0


cdef void flush_group(txctx_t *c, txgroup_t *g) noexcept nogil:
    """Send one group's frames: one UDP_SEGMENT send, else sendmmsg (its frames stay in
    the buffer until the whole batch is flushed)."""
    cdef int count = g.count, sent = 0, k
    cdef long rc
    if count == 0:
        return
    g.count = 0
    if c.capture:
        capture(c.owner, g.iov, count, 1)
        return
    if count == 1:
        sent = 1 if sendto(g.fd, g.iov[0].iov_base, g.iov[0].iov_len, 0,
                           <sockaddr *>&g.route.addr, uf_sockaddr_len(&g.route.addr)) >= 0 else 0
        c.ctr[C_TX_CALLS] += sent
    else:
        if gso_on(c.e):  # queue_packet kept the sizes UDP_SEGMENT needs
            rc = uf_send_gso_iov(g.fd, g.iov, count, <uint16_t>g.seg, &g.route.addr)
            if rc >= 0:
                sent = count
                c.ctr[C_TX_CALLS] += 1
            else:
                gso_failed(c.e, c.ctr, rc)
        if sent == 0:
            for k in range(count):
                c.tx_iov[2 * k] = g.iov[k]
                c.tx_iov[2 * k + 1].iov_base = NULL
                c.tx_iov[2 * k + 1].iov_len = 0
            rc = uf_send_many_iov(g.fd, c.tx_iov, count, &g.route.addr, &c.e.mmsg_tx,
                                  &c.ctr[C_TX_CALLS])
            sent = <int>rc if rc > 0 else 0
    for k in range(sent, count):  # exact counters: undo what did not leave
        c.ctr[C_TX_PACKETS] -= 1
        c.ctr[C_TX_BYTES] -= g.iov[k].iov_len - g.hdr
        c.ctr[D_SEND_ERROR] += 1


# ---- virtio reads: checksums to finish, TSO super-packets to cut -------------------

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
        if v[1] != GSO_TCPV4 and v[1] != GSO_TCPV6 and v[1] != GSO_UDP_L4:
            tx_drop(c, D_BAD_OFFLOAD)  # (ECN, 0x80: TSO_ECN is not asked for)
            return
        flush_batch(c)  # keep the order of packets on the wire
        send_segments(c, pkt, plen, gso_size, 17 if v[1] == GSO_UDP_L4 else 6,
                      4 if v[1] == GSO_TCPV4 else (6 if v[1] == GSO_TCPV6 else 0))
        return
    if v[0] & NEEDS_CSUM:
        if cstart >= plen or cstart + coff + 2 > plen:
            tx_drop(c, D_BAD_OFFLOAD)
            return
        # The field already holds the pseudo-header sum, so summing from csum_start to
        # the end and inverting gives the full checksum. A UDP checksum of 0 means
        # "none": its ones' complement twin FFFF is sent.
        csum = ~uf_csum_fold(uf_csum_partial(pkt + cstart, plen - cstart, 0))
        if csum == 0 and ((plen >= 20 and (pkt[0] >> 4) == 4 and pkt[9] == 17)
                          or (plen >= 40 and (pkt[0] >> 4) == 6 and pkt[6] == 17)):
            csum = 0xFFFF
        _store_native16(pkt + cstart + coff, csum)
    queue_packet(c, pkt, plen)


cdef void send_segments(txctx_t *c, uint8_t *pkt, Py_ssize_t n, uint16_t mss,
                        uint8_t proto, int version) noexcept nogil:
    """Cut a TCP (proto 6) or UDP (proto 17) super-packet, IPv4 or IPv6 (`version`: the
    one its virtio GSO type names; 0: either), into MSS-sized segments, each its own
    frame (VXLAN, or bare for udp framing) with fresh IP lengths (IPv4: id and header
    checksum too) and TCP seq/flags/checksum or UDP length/checksum, and send them a
    window at a time (one UDP_SEGMENT call, or sendmmsg). Only the headers are written
    (into obuf); each frame's payload is an iovec into the read buffer. IPv6 extension
    headers are not followed: the transport header must come first."""
    cdef eng_t *e = c.e
    cdef Py_ssize_t ihl, thl, hlen, payload, stride, off, chunk, window_bytes, fb
    cdef uint16_t csum, ident = 0
    cdef uint32_t seq
    cdef uint64_t pseudo
    cdef uint8_t flags
    cdef route_t *r
    cdef int i, k, count, window, sent, built, fd, act
    cdef int v = pkt[0] >> 4 if n > 0 else 0
    cdef uint8_t *f
    cdef uint8_t *ip
    cdef uint8_t *tcp
    if n < 28 or (v != 4 and v != 6) or (version != 0 and v != version):
        tx_drop(c, D_BAD_OFFLOAD)
        return
    ihl = (pkt[0] & 0x0F) * 4 if v == 4 else IPV6_HLEN
    if (ihl < 20 or n < ihl + (20 if proto == 6 else 8)
            or (pkt[9] if v == 4 else pkt[6]) != proto):
        tx_drop(c, D_BAD_OFFLOAD)
        return
    thl = (pkt[ihl + 12] >> 4) * 4 if proto == 6 else 8
    hlen = ihl + thl
    if (thl < (20 if proto == 6 else 8) or n < hlen or mss == 0
            or HEADROOM + hlen + mss > UDP_MAX_PAYLOAD):
        tx_drop(c, D_BAD_OFFLOAD)  # (a segment must fit one UDP datagram)
        return
    r = find(e, c.rt, _be32(pkt + 16)) if v == 4 else find6(e, c.rt, uf_load128(pkt + 24))
    if r == NULL:
        if v == 4:
            act = unroutable(c, pkt, n, _be32(pkt + 16))
        else:
            act = unreachable6(c, pkt, n, uf_load128(pkt + 24))
        if act == ACT_ICMP:
            tx_write_icmp(c)
        return
    fb = framing_bytes(r)
    if r.framing == FRAME_UDP and not udp_framing_ttl(pkt):  # every segment carries its TTL
        tx_drop(c, D_TTL_EXPIRED)
        return
    fd = tx_fd(e, r, pkt, n)
    c.ctr[C_TX_SUPER] += 1
    payload = n - hlen
    count = <int>((payload + mss - 1) // mss) if payload > 0 else 1
    stride = fb + hlen + mss
    window = MAX_WINDOW
    if gso_on(e) and window > UDP_MAX_PAYLOAD // stride:
        window = <int>(UDP_MAX_PAYLOAD // stride)
    if v == 4:
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
                put_vxlan_headers(e, r, f)
            ip = f + fb
            tcp = ip + ihl
            memcpy(ip, pkt, hlen)
            if v == 4:
                _put16(ip + 2, <uint16_t>(hlen + chunk))
                _put16(ip + 4, <uint16_t>(ident + i + k))
                _ip_checksum(ip, ihl)
                pseudo = uf_pseudo4(ip, proto, <uint16_t>(thl + chunk))
            else:
                _put16(ip + 4, <uint16_t>(thl + chunk))  # the payload length
                pseudo = uf_pseudo6(ip, proto, <uint32_t>(thl + chunk))
            if proto == 6:
                _put32(tcp + 4, seq + <uint32_t>off)
                if i + k != count - 1:
                    tcp[13] = flags & ~(TCP_FIN | TCP_PSH)
                _store_native16(tcp + 16, 0)
                _store_native16(tcp + 16, ~uf_csum_fold(uf_csum_partial(
                    pkt + hlen + off, chunk, uf_csum_partial(tcp, thl, pseudo))))
            else:  # UDP: each datagram its own length and checksum (0 is sent as FFFF)
                _put16(tcp + 4, <uint16_t>(8 + chunk))
                _store_native16(tcp + 6, 0)
                csum = ~uf_csum_fold(uf_csum_partial(
                    pkt + hlen + off, chunk, uf_csum_partial(tcp, 8, pseudo)))
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
            c.ctr[C_TX_CALLS] += 1
            return count
        gso_failed(c.e, c.ctr, rc)
    rc = uf_send_many_iov(fd, c.tx_iov, count, &r.addr, &c.e.mmsg_tx, &c.ctr[C_TX_CALLS])
    return <int>rc if rc > 0 else 0


# ---- reading the TUN ---------------------------------------------------------------

cdef void tx_write_icmp(txctx_t *c) noexcept nogil:
    """Our ICMP reply into the TUN (behind a zero virtio header with vnet_hdr)."""
    write_tun(c.capture, c.owner, uf_load_int(&c.tun_fd), c.plain_iov,
              plain_iov(c.e.vnet, c.plain_iov, c.icmp, c.icmp_len))


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


cdef void *tx_thread(void *arg) noexcept nogil:
    cdef txctx_t *c = <txctx_t *>arg
    cdef int n
    while not uf_load_int(&c.t.stop):
        n = tun_burst(c, BUDGET, True)
        go_quiet(&c.t, c.e)
        if n < 0:
            c.t.error = -n
            break
    thread_done(&c.t, c.e)
    return NULL
