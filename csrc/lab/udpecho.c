/* The latency floor's yardstick: a UDP echo between two namespaces.
 *
 *   udpecho server ADDR PORT                 answer every datagram, forever
 *   udpecho client ADDR PORT COUNT GAP_US    COUNT round trips GAP_US apart; prints
 *                                            one RTT per line, in microseconds
 *
 * A kernel ping between the same namespaces wakes only the pinging process; this
 * echo also wakes the server process once per round trip. The difference of the two
 * medians is one process wakeup, w: the least a userspace data plane adds each time
 * a packet passes through it (udpflannel bench reports it).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int usage(void)
{
    fprintf(stderr, "usage: udpecho server ADDR PORT | client ADDR PORT COUNT GAP_US\n");
    return 2;
}

int main(int argc, char **argv)
{
    struct sockaddr_in addr;
    int fd;
    char buf[2048];
    if (argc < 4)
        return usage();
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1)
        return usage();
    fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    if (strcmp(argv[1], "server") == 0) {
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
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
    if (strcmp(argv[1], "client") == 0 && argc == 6) {
        int count = atoi(argv[4]), gap = atoi(argv[5]);
        struct timeval timeout = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
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
    return usage();
}
