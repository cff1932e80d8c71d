"""Placeholder until the CNI plugin lands (issue 11)."""

import sys


def main() -> int:
    print('{"cniVersion": "1.0.0", "code": 4, "msg": "udpflannel-cni is not built yet"}')
    return 1


if __name__ == "__main__":
    sys.exit(main())
