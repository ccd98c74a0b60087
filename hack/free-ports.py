"""Prints N loopback ports nothing listens on: `free-ports.py N`.

They are drawn from 12000-19999: below Linux's ephemeral range (32768 and up), where a busy
machine's outgoing connections take their local ports, and apart from the Rust tests' own
(20000-32767). So only a listener started between this choice and the server's bind could take
one.
"""

import random
import socket
import sys

socks = []
while len(socks) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(12000, 20000)))
        socks.append(s)
    except OSError:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
