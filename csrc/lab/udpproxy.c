/*
 * udpproxy: a lab stand-in for the data path of flanneld's udp backend.
 *
 * Not part of udpflannel: tests and the benchmark run it as "a flanneld udp node",
 * so it behaves like flannel's C proxy (pkg/backend/udp/proxy_amd64.c) where peers
 * or speed can tell:
 *
 *   - one thread, poll() on the TUN fd, the UDP socket fd and a control fd;
 *   - one packet per syscall: read() from the TUN then sendto() the bare IPv4
 *     packet to the route's next hop; recv() from the socket then write() to the TUN;
 *     while either fd is readable the loop bypasses poll() (as flannel's does);
 *   - buffers of the TUN's MTU (a longer datagram is truncated, as in flannel);
 *   - routes in an array scanned linearly, the matching entry swapped to the front;
 *   - TTL decremented on both sides (checksum patched, RFC 1624), dropped at zero;
 *   - no route: ICMP type 3 code 0 (net unreachable) written into the TUN, from the
 *     TUN's address (<subnet .0>), TTL 8; never about an ICMP packet (flannel refuses
 *     all ICMP, not just errors) nor about a non-first fragment;
 *   - no validation of what arrives on the socket (flannel trusts its peers).
 *
 * Control: the agent writes fixed 12-byte commands, in network byte order, into a
 * SOCK_SEQPACKET socket (one command per message):
 *
 *     u8 cmd (1 set route, 2 delete route, 3 stop) | u8 prefix length |
 *     u16 next-hop UDP port | u32 destination network | u32 next-hop IPv4
 *
 * Unlike flannel's, this loop also reads the control socket every CTL_EVERY rounds
 * of a busy stretch (flannel's may neglect it as long as traffic flows), and exits
 * when the agent closes it, so a killed agent never leaves a proxy behind.
 *
 * usage: udpproxy TUN_FD UDP_FD CTL_FD TUN_ADDR MTU [-v]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CMD_SET_ROUTE = 1, CMD_DEL_ROUTE = 2, CMD_STOP = 3 };
#define CMD_SIZE 12
#define CTL_EVERY 64
#define IP_HDR 20
#define ICMP_HDR 8
#define IPPROTO_ICMP_ 1

struct route {
	uint32_t net, mask; /* network byte order */
	struct sockaddr_in hop;
};

static struct route *routes;
static size_t route_count, route_room;
static uint32_t tun_addr; /* network byte order */
static int verbose;
static volatile sig_atomic_t stopping;

static struct {
	unsigned long tx, rx, unreachable, ttl_drops, send_errors, non_ipv4;
} count;

#define LOG(...) do { if (verbose) fprintf(stderr, "udpproxy: " __VA_ARGS__); } while (0)

static uint32_t mask_of(int plen) {
	return plen <= 0 ? 0 : htonl(~(uint32_t)0 << (32 - plen));
}

static uint16_t checksum(const uint8_t *p, size_t len) {
	uint32_t sum = 0;
	for (; len > 1; p += 2, len -= 2)
		sum += (uint32_t)p[0] << 8 | p[1];
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return htons((uint16_t)~sum);
}

/* --- routes -------------------------------------------------------------------- */

static void set_route(uint32_t net, uint32_t mask, const struct sockaddr_in *hop) {
	for (size_t i = 0; i < route_count; i++) {
		if (routes[i].net == net && routes[i].mask == mask) {
			routes[i].hop = *hop;
			return;
		}
	}
	if (route_count == route_room) {
		size_t room = route_room ? 2 * route_room : 8;
		struct route *grown = realloc(routes, room * sizeof *routes);
		if (!grown) {
			fprintf(stderr, "udpproxy: out of memory for %zu routes\n", room);
			return;
		}
		routes = grown;
		route_room = room;
	}
	routes[route_count++] = (struct route){net, mask, *hop};
}

static void del_route(uint32_t net, uint32_t mask) {
	for (size_t i = 0; i < route_count; i++) {
		if (routes[i].net == net && routes[i].mask == mask) {
			routes[i] = routes[--route_count];
			return;
		}
	}
}

static const struct sockaddr_in *find_route(uint32_t dst) {
	for (size_t i = 0; i < route_count; i++) {
		if ((dst & routes[i].mask) == routes[i].net) {
			if (i) { /* bursts go to one peer: keep it first */
				struct route hit = routes[i];
				routes[i] = routes[0];
				routes[0] = hit;
			}
			return &routes[0].hop;
		}
	}
	return NULL;
}

/* --- packets ------------------------------------------------------------------- */

/* 0 when the packet must be dropped (TTL reached zero). */
static int decrement_ttl(uint8_t *ip) {
	if (ip[8] <= 1)
		return 0;
	ip[8]--;
	/* the 16-bit word holding TTL dropped by 0x0100: add it back to the checksum */
	uint32_t sum = ((uint32_t)ip[10] << 8 | ip[11]) + 0x0100;
	sum = (sum & 0xFFFF) + (sum >> 16);
	ip[10] = sum >> 8;
	ip[11] = sum & 0xFF;
	return 1;
}

static void send_net_unreachable(int tun, const uint8_t *offender, size_t len) {
	size_t ihl = (offender[0] & 0x0F) * 4;
	if (ihl < IP_HDR || ihl > len)
		return; /* malformed */
	if (offender[9] == IPPROTO_ICMP_)
		return; /* RFC 792: no ICMP about ICMP (flannel: about any ICMP) */
	if (((offender[6] << 8 | offender[7]) & 0x1FFF) != 0)
		return; /* only about a first fragment */

	uint8_t pkt[IP_HDR + ICMP_HDR + 60 + 8];
	size_t quoted = ihl + 8;
	size_t total = IP_HDR + ICMP_HDR + quoted;
	memset(pkt, 0, sizeof pkt);
	pkt[0] = 0x45;
	pkt[2] = total >> 8;
	pkt[3] = total & 0xFF;
	pkt[8] = 8; /* TTL, as flannel */
	pkt[9] = IPPROTO_ICMP_;
	memcpy(pkt + 12, &tun_addr, 4);
	memcpy(pkt + 16, offender + 12, 4); /* back to the offender's source */
	uint16_t ipsum = checksum(pkt, IP_HDR);
	memcpy(pkt + 10, &ipsum, 2);

	uint8_t *icmp = pkt + IP_HDR;
	icmp[0] = 3; /* destination unreachable */
	icmp[1] = 0; /* net unreachable */
	memcpy(icmp + ICMP_HDR, offender, quoted < len ? quoted : len);
	uint16_t icsum = checksum(icmp, ICMP_HDR + quoted);
	memcpy(icmp + 2, &icsum, 2);

	if (write(tun, pkt, total) != (ssize_t)total)
		LOG("writing ICMP net unreachable failed: %s\n", strerror(errno));
	else
		count.unreachable++;
}

/* Each returns 1 when it moved (or dropped) a packet, 0 when its fd had nothing. */
static int tun_to_udp(int tun, int sock, uint8_t *buf, size_t size) {
	ssize_t n = read(tun, buf, size);
	if (n < IP_HDR) {
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			LOG("TUN read failed: %s\n", strerror(errno));
		return 0;
	}
	if (buf[0] >> 4 != 4) { /* e.g. IPv6 router solicitations: not ours to carry */
		count.non_ipv4++;
		return 1;
	}
	uint32_t dst;
	memcpy(&dst, buf + 16, 4);
	const struct sockaddr_in *hop = find_route(dst);
	if (!hop) {
		send_net_unreachable(tun, buf, (size_t)n);
		return 1;
	}
	if (!decrement_ttl(buf)) {
		count.ttl_drops++;
		return 1;
	}
	if (sendto(sock, buf, (size_t)n, 0, (const struct sockaddr *)hop, sizeof *hop) != n) {
		count.send_errors++;
		LOG("UDP send to %s:%u failed: %s\n", inet_ntoa(hop->sin_addr), ntohs(hop->sin_port),
		    strerror(errno));
	} else {
		count.tx++;
	}
	return 1;
}

static int udp_to_tun(int sock, int tun, uint8_t *buf, size_t size) {
	ssize_t n = recv(sock, buf, size, MSG_DONTWAIT);
	if (n < IP_HDR) {
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			LOG("UDP recv failed: %s\n", strerror(errno));
		return 0;
	}
	if (!decrement_ttl(buf)) {
		count.ttl_drops++;
		return 1;
	}
	ssize_t w;
	while ((w = write(tun, buf, (size_t)n)) < 0 && (errno == EAGAIN || errno == EINTR))
		;
	if (w != n)
		LOG("TUN write failed: %s\n", w < 0 ? strerror(errno) : "short write");
	else
		count.rx++;
	return 1;
}

/* --- control ------------------------------------------------------------------- */

/* Reads every pending command; returns once none is left. */
static void process_commands(int ctl) {
	uint8_t cmd[CMD_SIZE];
	for (;;) {
		ssize_t n = recv(ctl, cmd, sizeof cmd, MSG_DONTWAIT);
		if (n < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
				fprintf(stderr, "udpproxy: control socket failed: %s\n", strerror(errno));
				stopping = 1;
			}
			return;
		}
		if (n == 0) { /* the agent is gone */
			stopping = 1;
			return;
		}
		if (n != CMD_SIZE) {
			fprintf(stderr, "udpproxy: ignoring a %zd-byte command\n", n);
			continue;
		}
		int plen = cmd[1];
		uint32_t net, hop_ip;
		memcpy(&net, cmd + 4, 4);
		memcpy(&hop_ip, cmd + 8, 4);
		uint32_t mask = mask_of(plen > 32 ? 32 : plen);
		if (cmd[0] == CMD_SET_ROUTE) {
			struct sockaddr_in hop = {.sin_family = AF_INET};
			hop.sin_addr.s_addr = hop_ip;
			memcpy(&hop.sin_port, cmd + 2, 2);
			set_route(net & mask, mask, &hop);
		} else if (cmd[0] == CMD_DEL_ROUTE) {
			del_route(net & mask, mask);
		} else if (cmd[0] == CMD_STOP) {
			stopping = 1;
		} else {
			fprintf(stderr, "udpproxy: unknown command %u\n", cmd[0]);
		}
	}
}

static void on_signal(int sig) {
	(void)sig;
	stopping = 1;
}

static int fd_arg(const char *text) {
	char *end;
	long v = strtol(text, &end, 10);
	if (*text == '\0' || *end != '\0' || v < 0 || v > 65535) {
		fprintf(stderr, "udpproxy: %s is not a file descriptor number\n", text);
		exit(2);
	}
	return (int)v;
}

int main(int argc, char **argv) {
	if (argc < 6 || argc > 7 || (argc == 7 && strcmp(argv[6], "-v") != 0)) {
		fprintf(stderr, "usage: udpproxy TUN_FD UDP_FD CTL_FD TUN_ADDR MTU [-v]\n");
		return 2;
	}
	int tun = fd_arg(argv[1]), sock = fd_arg(argv[2]), ctl = fd_arg(argv[3]);
	struct in_addr addr;
	if (inet_pton(AF_INET, argv[4], &addr) != 1) {
		fprintf(stderr, "udpproxy: %s is not an IPv4 address\n", argv[4]);
		return 2;
	}
	tun_addr = addr.s_addr;
	long mtu = strtol(argv[5], NULL, 10);
	if (mtu < 68 || mtu > 65535) {
		fprintf(stderr, "udpproxy: MTU %s is out of range 68..65535\n", argv[5]);
		return 2;
	}
	verbose = argc == 7;

	struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: poll() returns */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	fcntl(tun, F_SETFL, fcntl(tun, F_GETFL) | O_NONBLOCK);

	size_t size = (size_t)mtu;
	uint8_t *buf = malloc(size);
	if (!buf) {
		fprintf(stderr, "udpproxy: cannot allocate a %zu-byte buffer\n", size);
		return 1;
	}
	struct pollfd fds[3] = {{.fd = tun, .events = POLLIN}, {.fd = sock, .events = POLLIN},
	                        {.fd = ctl, .events = POLLIN}};
	while (!stopping) {
		if (poll(fds, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "udpproxy: poll failed: %s\n", strerror(errno));
			return 1;
		}
		if (fds[2].revents)
			process_commands(ctl);
		if ((fds[0].revents | fds[1].revents) & POLLIN) {
			unsigned rounds = 0;
			int moved;
			do { /* bypass poll() while either side has packets */
				moved = tun_to_udp(tun, sock, buf, size);
				moved += udp_to_tun(sock, tun, buf, size);
				if (++rounds % CTL_EVERY == 0)
					process_commands(ctl);
			} while (moved && !stopping);
		}
	}
	fprintf(stderr, "udpproxy: stopped: tx %lu rx %lu unreachable %lu ttl_drops %lu send_errors %lu "
	        "non_ipv4 %lu routes %zu\n", count.tx, count.rx, count.unreachable, count.ttl_drops,
	        count.send_errors, count.non_ipv4, route_count);
	free(buf);
	free(routes);
	return 0;
}
