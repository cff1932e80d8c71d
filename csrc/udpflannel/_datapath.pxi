# Included by _engine.pyx: the data path as C functions over (eng_t, context), in
# three files: _tx.pxi (TUN -> UDP), _rx.pxi (UDP -> TUN) and this one, the rules and
# helpers both directions share, and the threads that run them. They hold no GIL and
# create no Python object, except where a context's `capture` flag sends output to a
# test's list instead of the fds (then they take the GIL).
#
# A context's `rt` is the route table its current burst reads: the loop mode and the
# single-packet API set it to the published table; a thread loads it after waking.

# ---- shared rules ------------------------------------------------------------------

cdef inline int tx_drop(txctx_t *c, int reason) noexcept nogil:
    c.ctr[reason] += 1
    c.last_drop = reason
    return ACT_DROP


cdef inline int rx_drop(rxctx_t *c, int reason) noexcept nogil:
    c.ctr[reason] += 1
    c.last_drop = reason
    return ACT_DROP


cdef inline route_t *find(const eng_t *e, const rtab_t *t, uint32_t addr) noexcept nogil:
    """The route to the subnet holding an IPv4 address, or NULL."""
    cdef int32_t i
    if not e.has4 or (addr & e.netmask) != e.net:
        return NULL
    i = htab_get(&t.by_subnet, uf_key4((addr >> e.shift) << e.shift))
    return NULL if i < 0 else &t.routes[i]


cdef inline bint in_net6(const eng_t *e, uf_u128 addr) noexcept nogil:
    return e.has6 and (addr & e.mask6) == e.net6


cdef inline route_t *find6(const eng_t *e, const rtab_t *t, uf_u128 addr) noexcept nogil:
    """The route to the subnet holding an IPv6 address, or NULL."""
    cdef int32_t i
    if not in_net6(e, addr):
        return NULL
    i = htab_get(&t.by_subnet, (addr >> e.shift6) << e.shift6)
    return NULL if i < 0 else &t.routes[i]


# ---- framing (both directions) -----------------------------------------------------

cdef inline Py_ssize_t framing_bytes(const route_t *r) noexcept nogil:
    """What a route's framing puts in front of the IP packet (VXLAN: HEADROOM)."""
    return HEADROOM if r.framing == FRAME_VXLAN else 0


cdef inline bint udp_framing_ttl(uint8_t *ip) noexcept nogil:
    """flanneld udp framing, on each side: the TTL goes down by one (fresh header
    checksum); False, and nothing changed, when it would reach 0: flannel's proxy
    drops such packets (the caller counts ttl_expired)."""
    if ip[8] <= 1:
        return False
    ip[8] -= 1
    _ip_checksum(ip, (ip[0] & 0x0F) * 4)
    return True


# ---- writes to the TUN (both directions: ICMP replies and delivered packets) -------

cdef inline int plain_iov(bint vnet, iovec *iov, uint8_t *p, Py_ssize_t n) noexcept nogil:
    """One packet as is, in iov (room for two); with vnet_hdr behind an all-zero virtio
    header gathered from its own buffer, so nothing in front of p is touched. Returns
    the iovec count."""
    cdef int k = 0
    if vnet:
        iov[0].iov_base = <void *>ZERO_VNET
        iov[0].iov_len = VNET
        k = 1
    iov[k].iov_base = p
    iov[k].iov_len = n
    return k + 1


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


# ---- threads -----------------------------------------------------------------------
# Each thread loops: block for the first packet, take the published route table, work
# through the burst, then go quiet (active = 0, seen = the generation it read), so the
# control thread knows when a retired table is no longer in anyone's hands. tx_thread
# (_tx.pxi) and rx_thread (_rx.pxi) run one direction each (--io threads); poll_thread
# both directions of a queue (--io poll).

cdef inline void go_quiet(thr_t *t, eng_t *e) noexcept nogil:
    uf_store_u64(&t.seen, uf_load_u64(&e.gen))
    uf_store_int(&t.active, 0)


cdef inline void thread_done(thr_t *t, eng_t *e) noexcept nogil:
    """The thread returns: say so, and wake the loop (a thread that ends on its own
    means its fd failed)."""
    uf_store_int(&t.running, 0)
    uf_notify(e.notify_fd)


cdef void *poll_thread(void *arg) noexcept nogil:
    """--io poll: one thread for both directions of a queue. It waits (epoll) until the
    TUN or one of the queue's sockets is readable and gives each ready one a burst,
    sockets first. What the kernel answers while packets are written to the TUN (a TCP
    receiver's ACKs, a ping reply) makes the TUN ready before the thread waits again,
    so it is read without the thread ever sleeping, where --io threads wakes a second
    thread for it (bench/RESULTS.md, "Conclusions that hold"). The context's table and
    quiescent state cover the sockets it drains."""
    cdef txctx_t *c = <txctx_t *>arg
    cdef rxctx_t *p
    cdef int fds[4]
    cdef int n = 1, k, r, rc, ep, ready = 0
    cdef bint failed = False
    fds[0] = c.tun_fd
    for k in range(3):
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
    thread_done(&c.t, c.e)
    return NULL
