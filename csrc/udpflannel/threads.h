/* Threads for the engine's data path: start, wake, join, and the atomics that let
 * the control thread publish route tables to them.
 *
 * A data thread blocks in the kernel (read on the TUN, recvmsg on a socket). To stop
 * it, the control side sets its stop flag and sends it UF_WAKE_SIGNAL with
 * pthread_kill: the handler does nothing, and because it is installed without
 * SA_RESTART the blocking call returns EINTR, the thread sees the flag and returns.
 * The signal is re-sent until the thread is gone (it may arrive just before the
 * thread blocks). Python never sees this signal: it is a real-time signal Python does
 * not handle, sent only to threads created here.
 */
#ifndef UDPFLANNEL_THREADS_H
#define UDPFLANNEL_THREADS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define UF_WAKE_SIGNAL (SIGRTMIN + 7)

static void uf_wake_handler(int sig) { (void)sig; }

/* Install the wake handler once per process (idempotent). 0 or -errno. */
static inline int uf_wake_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = uf_wake_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  /* no SA_RESTART: blocking calls return EINTR */
    return sigaction(UF_WAKE_SIGNAL, &sa, NULL) < 0 ? -errno : 0;
}

typedef void *(*uf_thread_fn)(void *);

/* Start a thread with UF_WAKE_SIGNAL unblocked, named `name` (at most 15 characters,
 * what top -H and /proc/<pid>/task/<tid>/comm show), on CPU `cpu` only when cpu >= 0
 * (set before it runs: its first packet is already read there); 0 or -errno. */
static inline int uf_thread_start(pthread_t *tid, uf_thread_fn fn, void *arg, int cpu,
                                  const char *name)
{
    sigset_t wake, old;
    pthread_attr_t attr;
    cpu_set_t set;
    int rc;
    if ((rc = pthread_attr_init(&attr)) != 0)
        return -rc;
    if (cpu >= 0) {
        if (cpu >= CPU_SETSIZE) {
            pthread_attr_destroy(&attr);
            return -EINVAL;
        }
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if ((rc = pthread_attr_setaffinity_np(&attr, sizeof set, &set)) != 0) {
            pthread_attr_destroy(&attr);
            return -rc;
        }
    }
    sigemptyset(&wake);
    sigaddset(&wake, UF_WAKE_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &wake, &old);  /* inherited by the new thread */
    rc = pthread_create(tid, &attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc == 0)
        (void)pthread_setname_np(*tid, name);  /* a label only: its failure changes nothing */
    return -rc;
}

/* Wake a thread until it has returned (its `running` flag drops), then join it. */
static inline void uf_thread_stop(pthread_t tid, volatile int *running)
{
    struct timespec pause = {0, 2 * 1000 * 1000};  /* 2 ms */
    while (__atomic_load_n(running, __ATOMIC_ACQUIRE)) {
        pthread_kill(tid, UF_WAKE_SIGNAL);
        nanosleep(&pause, NULL);
    }
    pthread_join(tid, NULL);
}

/* The first read blocks; the ones that follow within a burst must not: preadv2 with
 * RWF_NOWAIT on the same (blocking) TUN fd returns EAGAIN when it is empty. */
static inline long uf_read_nowait(int fd, void *buf, size_t len)
{
    struct iovec iov = {buf, len};
    long n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    return n < 0 ? -errno : n;
}

/* --io poll's wait: an epoll set of up to 4 fds (the TUN first), made once per thread
 * (registering on every fd's wait queue at each wait, as poll(2) does, costs more).
 * The fd of the set, or -errno. */
static inline int uf_waiter_open(const int *fds, int n)
{
    struct epoll_event ev;
    int ep, i;
    if (n < 1 || n > 4)
        return -EINVAL;
    if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        return -errno;
    for (i = 0; i < n; i++) {
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN;
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int err = errno;
            close(ep);
            return -err;
        }
    }
    return ep;
}

/* Block until a fd of the set is readable or has an error to report; *ready gets bit
 * i set for fds[i]. 0, or -errno (-EINTR when woken to stop). */
static inline int uf_waiter_wait(int ep, int *ready)
{
    struct epoll_event ev[4];
    int n, i;
    *ready = 0;
    if ((n = epoll_wait(ep, ev, 4, -1)) < 0)
        return -errno;
    for (i = 0; i < n; i++)
        *ready |= 1 << ev[i].data.u32;
    return 0;
}

/* Sequentially consistent on purpose: publishing a table and checking whether a
 * thread is active, against a thread marking itself active and loading the table,
 * is a store-then-load pattern on both sides (see _datapath.pxi, "threads"). */
static inline void *uf_load_ptr(void **p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void uf_store_ptr(void **p, void *v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t uf_load_u64(volatile uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void uf_store_u64(volatile uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int uf_load_int(volatile int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void uf_store_int(volatile int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

/* Tell the event loop a thread ended (its eventfd becomes readable). */
static inline void uf_notify(int efd)
{
    uint64_t one = 1;
    if (efd >= 0)
        (void)!write(efd, &one, sizeof one);
}

#endif
