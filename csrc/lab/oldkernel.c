/* Run a command as if on an older or stripped kernel: a seccomp filter (libseccomp),
 * installed before exec and inherited by every child, refuses the newer features the
 * way such a kernel does.
 *
 *   oldkernel REFUSE[,REFUSE...] -- COMMAND [ARG...]
 *
 *   udp-gso      setsockopt(SOL_UDP, UDP_SEGMENT): ENOPROTOOPT    (Linux < 4.18)
 *   udp-gro      setsockopt(SOL_UDP, UDP_GRO): ENOPROTOOPT        (Linux < 5.0)
 *   tun-uso      ioctl(TUNSETOFFLOAD) asking USO4 or USO6: EINVAL  (Linux < 6.2)
 *   tun-offload  ioctl(TUNSETOFFLOAD), any flags: EINVAL           (no TUN TSO)
 *   mmsg         sendmmsg, recvmmsg: ENOSYS                        (Linux < 2.6.33 / 3.0)
 *   none         nothing (the same launcher, no filter: a control)
 *
 * A kernel without UDP_SEGMENT ignores the cmsg on a send rather than refusing it;
 * the engine only sends it after setsockopt said yes, so refusing setsockopt is
 * enough. Everything else is allowed. Exit 2 on a bad argument, 3 when the filter
 * cannot be installed, 127 when the command cannot be run.
 */
#include <errno.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SOL_UDP_ 17
#define UDP_SEGMENT_ 103
#define UDP_GRO_ 104
#define TUNSETOFFLOAD_ 0x400454d0UL
#define TUN_F_USO4_ 0x20
#define TUN_F_USO6_ 0x40

static int usage(void)
{
    fprintf(stderr, "usage: oldkernel udp-gso,udp-gro,tun-uso,tun-offload,mmsg|none -- COMMAND [ARG...]\n");
    return 2;
}

static int refuse(scmp_filter_ctx ctx, const char *what)
{
    if (strcmp(what, "udp-gso") == 0 || strcmp(what, "udp-gro") == 0)
        return seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOPROTOOPT), SCMP_SYS(setsockopt), 2,
                                SCMP_A1(SCMP_CMP_EQ, SOL_UDP_),
                                SCMP_A2(SCMP_CMP_EQ,
                                        strcmp(what, "udp-gso") == 0 ? UDP_SEGMENT_ : UDP_GRO_));
    if (strcmp(what, "tun-uso") == 0) {
        int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EINVAL), SCMP_SYS(ioctl), 2,
                                  SCMP_A1(SCMP_CMP_EQ, TUNSETOFFLOAD_),
                                  SCMP_A2(SCMP_CMP_MASKED_EQ, TUN_F_USO4_, TUN_F_USO4_));
        return rc ? rc : seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EINVAL), SCMP_SYS(ioctl), 2,
                                          SCMP_A1(SCMP_CMP_EQ, TUNSETOFFLOAD_),
                                          SCMP_A2(SCMP_CMP_MASKED_EQ, TUN_F_USO6_, TUN_F_USO6_));
    }
    if (strcmp(what, "tun-offload") == 0)
        return seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EINVAL), SCMP_SYS(ioctl), 1,
                                SCMP_A1(SCMP_CMP_EQ, TUNSETOFFLOAD_));
    if (strcmp(what, "mmsg") == 0) {
        int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(sendmmsg), 0);
        return rc ? rc : seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(recvmmsg), 0);
    }
    if (strcmp(what, "none") == 0)
        return 0;
    return 1;
}

int main(int argc, char **argv)
{
    scmp_filter_ctx ctx;
    char *list, *what, *save = NULL;
    int rc;
    if (argc < 4 || strcmp(argv[2], "--") != 0)
        return usage();
    if ((ctx = seccomp_init(SCMP_ACT_ALLOW)) == NULL) {
        fprintf(stderr, "oldkernel: seccomp_init failed\n");
        return 3;
    }
    list = strdup(argv[1]);
    for (what = strtok_r(list, ",", &save); what; what = strtok_r(NULL, ",", &save)) {
        rc = refuse(ctx, what);
        if (rc > 0) {
            fprintf(stderr, "oldkernel: unknown feature %s\n", what);
            return usage();
        }
        if (rc < 0) {
            fprintf(stderr, "oldkernel: cannot refuse %s: %s\n", what, strerror(-rc));
            return 3;
        }
    }
    if ((rc = seccomp_load(ctx)) < 0) {
        fprintf(stderr, "oldkernel: cannot install the filter: %s\n", strerror(-rc));
        return 3;
    }
    seccomp_release(ctx);
    free(list);
    execvp(argv[3], argv + 3);
    fprintf(stderr, "oldkernel: cannot run %s: %s\n", argv[3], strerror(errno));
    return 127;
}
