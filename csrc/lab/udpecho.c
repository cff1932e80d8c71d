/* The latency floor's yardstick, and many small flows: UDP echoes between two namespaces.
 *
 *   udpecho server ADDR PORT                 answer every datagram to its sender, forever
 *   udpecho client ADDR PORT COUNT GAP_US    COUNT round trips GAP_US apart; prints
 *                                            one RTT per line, in microseconds
 *   udpecho flows ADDR PORT FLOWS SECONDS    FLOWS request/response flows for SECONDS;
 *                                            prints one summary line (below)
 *
 * client: a kernel ping between the same namespaces wakes only the pinging process;
 * this echo also wakes the server process once per round trip. The difference of the
 * two medians is one process wakeup, w: the least a userspace data plane adds each
 * time a packet passes through it (udpflannel bench reports it).
 *
 * flows: what DNS clients ask of a path. FLOWS sockets, each bound to its own source
 * port (so each is its own flow, its own 5-tuple), each keeping one 64-byte request
 * outstanding: send, wait for the answer, send the next (a closed loop, so the rate is
 * what the path sustains, not what we offer). One process drives them all with epoll.
 * A data plane tuned on one bulk flow may coalesce or batch in ways that only pay off
 * when packets of one flow follow each other; here consecutive packets belong to
 * different flows and each flow has one packet in flight, so nothing waits for a
 * companion. A request unanswered for LOST_US is counted lost and sent again (with a
 * new sequence number, so its late answer is told apart and ignored). On exit it prints
 *
 *   transactions=N seconds=S p50_us=X p99_us=Y lost=L late=K
 *
 * N answered requests in S seconds, the RTT percentiles of those N (linear between
 * closest ranks, as udpflannel.lab.benchlib.report.percentile), L requests given up,
 * K answers that came after their request was given up.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 64
#define LOST_US 200000.0   /* a request unanswered this long is lost */
#define SCAN_US 10000.0    /* how often the flows are checked for lost requests */

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int usage(void)
{
    fprintf(stderr, "usage: udpecho server ADDR PORT | client ADDR PORT COUNT GAP_US"
                    " | flows ADDR PORT FLOWS SECONDS\n");
    return 2;
}

static int server(int fd, const struct sockaddr_in *addr)
{
    char buf[2048];
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        perror("bind");
        return 1;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    for (;;) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("recvfrom");
            return 1;
        }
        sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, len);
    }
}

static int client(int fd, const struct sockaddr_in *addr, int count, int gap)
{
    char buf[2048];
    struct timeval timeout = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        perror("connect");
        return 1;
    }
    for (int i = 0; i < count; i++) {
        double t0 = now_us();
        memcpy(buf, &i, sizeof i);
        if (send(fd, buf, 64, 0) < 0) {
            perror("send");
            return 1;
        }
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n >= (ssize_t)sizeof i)
            printf("%.1f\n", now_us() - t0);
        else
            printf("lost\n");
        usleep(gap);
    }
    return 0;
}

/* -- flows ---------------------------------------------------------------------- */

struct flow {
    int fd;
    uint32_t seq;        /* of the request outstanding */
    double sent_us;      /* when it was sent */
};

struct rtts {
    float *v;
    size_t n, cap;
};

static int rtts_add(struct rtts *r, float x)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 65536;
        float *v = realloc(r->v, cap * sizeof *v);
        if (v == NULL)
            return -1;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = x;
    return 0;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* q-th percentile of sorted v[0..n), linear between closest ranks; -1 when empty */
static double percentile(const float *v, size_t n, double q)
{
    if (n == 0)
        return -1;
    double pos = (n - 1) * q / 100;
    size_t lo = (size_t)pos, hi = lo + 1 < n ? lo + 1 : n - 1;
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

/* Send flow f's next request (seq already set). A full socket buffer or a refused
 * port (ICMP from an earlier request) is left to the lost-request timer. */
static int request(struct flow *f)
{
    char buf[PAYLOAD] = {0};
    memcpy(buf, &f->seq, sizeof f->seq);
    f->sent_us = now_us();
    if (send(f->fd, buf, sizeof buf, 0) < 0 && errno != EAGAIN && errno != ENOBUFS
            && errno != ECONNREFUSED) {
        perror("send");
        return -1;
    }
    return 0;
}

static int flows(const struct sockaddr_in *addr, int nflows, double seconds)
{
    struct flow *fl = calloc((size_t)nflows, sizeof *fl);
    struct rtts rtts = {0};
    long lost = 0, late = 0;
    int ep = epoll_create1(0);
    if (fl == NULL || ep < 0) {
        perror("flows");
        return 1;
    }
    for (int i = 0; i < nflows; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        fl[i].fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fl[i].fd < 0 || connect(fl[i].fd, (const struct sockaddr *)addr, sizeof *addr) < 0
                || epoll_ctl(ep, EPOLL_CTL_ADD, fl[i].fd, &ev) < 0) {
            perror("flow socket");
            return 1;
        }
    }
    double start = now_us(), end = start + seconds * 1e6, next_scan = start + SCAN_US;
    for (int i = 0; i < nflows; i++)
        if (request(&fl[i]) < 0)
            return 1;
    struct epoll_event evs[256];
    for (;;) {
        double t = now_us();
        if (t >= end)
            break;
        if (t >= next_scan) {
            for (int i = 0; i < nflows; i++)
                if (t - fl[i].sent_us >= LOST_US) {
                    lost++;
                    fl[i].seq++;
                    if (request(&fl[i]) < 0)
                        return 1;
                }
            next_scan = t + SCAN_US;
        }
        double wait = (end < next_scan ? end : next_scan) - t;
        int n = epoll_wait(ep, evs, 256, (int)(wait / 1000) + 1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int k = 0; k < n; k++) {
            struct flow *f = &fl[evs[k].data.u32];
            char buf[2048];
            ssize_t got;
            while ((got = recv(f->fd, buf, sizeof buf, 0)) >= 0 || errno == ECONNREFUSED) {
                uint32_t seq;
                if (got < (ssize_t)sizeof seq)
                    continue;
                memcpy(&seq, buf, sizeof seq);
                if (seq != f->seq) {
                    late++;
                    continue;
                }
                if (rtts_add(&rtts, (float)(now_us() - f->sent_us)) < 0) {
                    perror("realloc");
                    return 1;
                }
                f->seq++;
                if (request(f) < 0)
                    return 1;
            }
            if (errno != EAGAIN && errno != EINTR) {
                perror("recv");
                return 1;
            }
        }
    }
    double took = (now_us() - start) / 1e6;
    qsort(rtts.v, rtts.n, sizeof *rtts.v, cmp_float);
    printf("transactions=%zu seconds=%.3f p50_us=%.1f p99_us=%.1f lost=%ld late=%ld\n", rtts.n,
           took, percentile(rtts.v, rtts.n, 50), percentile(rtts.v, rtts.n, 99), lost, late);
    return 0;
}

int main(int argc, char **argv)
{
    struct sockaddr_in addr;
    if (argc < 4)
        return usage();
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1)
        return usage();
    if (strcmp(argv[1], "flows") == 0 && argc == 6) {
        int n = atoi(argv[4]);
        double seconds = atof(argv[5]);
        if (n < 1 || seconds <= 0)
            return usage();
        return flows(&addr, n, seconds);
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    if (strcmp(argv[1], "server") == 0)
        return server(fd, &addr);
    if (strcmp(argv[1], "client") == 0 && argc == 6)
        return client(fd, &addr, atoi(argv[4]), atoi(argv[5]));
    return usage();
}
