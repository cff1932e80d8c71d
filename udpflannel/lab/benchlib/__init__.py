"""Pieces of `udpflannel bench` (the entry point is udpflannel/lab/bench.py).

- ``report``: metrics, medians, percentiles, ratios, the table and the JSON (pure)
- ``parse``:  iperf3 JSON, ping output and /proc text into numbers (pure)
- ``tools``:  iperf3 / ping processes inside namespaces, /proc sampling (I/O)
- ``cases``:  what is measured: bare veth, kernel VXLAN as flannel sets it up, and
              each udpflannel mode; each case builds and removes its own namespaces
- ``chart``:  the PNG (matplotlib, Agg)
"""
